"""Frozen, validated configuration objects.

`ModelConfig` is read from an HF `config.json`; it accepts both the transformers 5 spelling
(`rope_parameters`, `dtype`) and the older one (`rope_theta` + `rope_scaling`, `torch_dtype`).
Every value a user can get wrong is checked here, with a message that names the value and the limit.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpserve.errors import ConfigError
from tpserve.quant.config import QuantConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RopeConfig":
        params = dict(hf.get("rope_parameters") or {})
        # transformers 5 keeps theta inside rope_parameters; older configs keep it at top level.
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        rope = cls(rope_type=rope_type, theta=float(theta))
        if rope_type == "linear":
            rope = cls(rope_type=rope_type, theta=float(theta), factor=float(params["factor"]))
        elif rope_type == "llama3":
            rope = cls(
                rope_type=rope_type,
                theta=float(theta),
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        return rope


@dataclass(frozen=True)
class ModelConfig:
    """Global (unsharded) model shape; per-rank sizes are derived by the layers from `tp_size`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: str | torch.dtype | None = "auto") -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"model directory {str(model_dir)!r} has no config.json")
        with open(path) as f:
            hf = json.load(f)
        return cls.from_hf(hf, dtype)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str | torch.dtype | None = "auto") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architecture {arch!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # Qwen2 always has qkv bias; Llama/Mistral read `attention_bias` (default False).
        attention_bias = True if arch == "Qwen2ForCausalLM" else bool(hf.get("attention_bias", False))
        sliding_window = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            sliding_window = None
        config_dtype = parse_dtype(hf.get("dtype") or hf.get("torch_dtype"), torch.float32)
        cfg = cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope=RopeConfig.from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=parse_dtype(dtype, config_dtype),
            hf_config=hf,
        )
        cfg.validate()
        return cfg

    @functools.cached_property
    def quant(self) -> QuantConfig | None:
        """The checkpoint's quantization_config (None for float weights), parsed on first use, so
        that reading a model's shape does not depend on its quantisation being supported."""
        return QuantConfig.from_hf(self.hf_config)

    @property
    def quantization(self) -> str:
        """"none", or the checkpoint's quantisation label ("int8", "int4-g128", "gptq-4bit-g128",
        "awq-4bit-g128")."""
        return "none" if self.quant is None else self.quant.name

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    def check_tp(self, tp_size: int, quant: QuantConfig | None = None) -> None:
        """Fail with a clear message when the model, or its quantised checkpoint (`quant`, default:
        this config's), cannot be split `tp_size` ways."""
        problem = self._float_tp_problem(tp_size)
        if problem is not None:
            raise ConfigError(problem)
        quant = quant or self.quant
        problem = self.quant_tp_problem(tp_size, quant)
        if problem is not None:
            raise ConfigError(f"{quant.name} checkpoint cannot run at tp_size={tp_size}: {problem}; "
                              f"supported tp sizes: {self.supported_tp_sizes(quant)}")

    def quant_tp_problem(self, tp_size: int, quant: QuantConfig | None = None) -> str | None:
        """Why `quant` (default: this checkpoint's) cannot be split `tp_size` ways, or None."""
        quant = quant or self.quant
        if quant is None:
            return None
        return quant.tp_problem(self.hidden_size, self.num_attention_heads * self.head_dim,
                                self.intermediate_size, tp_size)

    def supported_tp_sizes(self, quant: QuantConfig | None = None) -> list[int]:
        """TP sizes both the float model (heads, kv heads, intermediate) and the checkpoint allow."""
        return [tp for tp in range(1, self.num_attention_heads + 1)
                if self._float_tp_problem(tp) is None and self.quant_tp_problem(tp, quant) is None]

    def _float_tp_problem(self, tp_size: int) -> str | None:
        if tp_size < 1:
            return f"tp_size={tp_size} must be >= 1"
        if self.num_attention_heads % tp_size:
            return (f"tp_size={tp_size} does not divide num_attention_heads={self.num_attention_heads}; "
                    f"use a tp_size that divides {self.num_attention_heads}")
        kv = self.num_key_value_heads
        if kv >= tp_size and kv % tp_size:
            return f"tp_size={tp_size} does not divide num_key_value_heads={kv}"
        if kv < tp_size and tp_size % kv:
            return (f"num_key_value_heads={kv} does not divide tp_size={tp_size}, so kv heads "
                    "cannot be replicated evenly")
        if self.intermediate_size % tp_size:
            return f"tp_size={tp_size} does not divide intermediate_size={self.intermediate_size}"
        return None


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry: `num_blocks` blocks of `block_size` tokens on every rank."""

    block_size: int = 16
    num_blocks: int | None = None
    cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    contiguous_rows: bool = True  # CPU attention reads per-sequence rows (tpserve.ops.kv_rows)

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 1024 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two in [1, 1024]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_blocks} must be >= 1")
        if self.cache_memory_bytes is not None and self.cache_memory_bytes < 1:
            raise ConfigError(f"kv_cache_memory={self.cache_memory_bytes} must be > 0 bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]"
            )
