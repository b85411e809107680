"""Architecture name (HF `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from tpserve.config import ConfigError, ModelConfig
from tpserve.distributed import TPGroup
from tpserve.models.llama import LlamaForCausalLM

# Mistral and Qwen2 differ from Llama only in config values (sliding window, qkv bias), which
# ModelConfig carries, so one implementation serves all three.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def build_model(config: ModelConfig, tp: TPGroup, quant=None) -> nn.Module:
    """Construct the model with uninitialised weights for this rank, on `tp.device`. `quant` is
    the linear method of every q/k/v/o/gate/up/down projection (tpserve.quant), None for float."""
    cls = MODEL_REGISTRY.get(config.architecture)
    if cls is None:
        raise ConfigError(
            f"architecture {config.architecture!r} is not supported; supported: {sorted(MODEL_REGISTRY)}"
        )
    # Heads, and quantisation groups vs row-parallel shards, before any allocation.
    config.check_tp(tp.tp_size, quant.config if quant is not None else None)
    with tp.device:
        return cls(config, tp, quant).eval()
