"""Tiny random HF checkpoints built on the fly (no model hub is reachable), saved as sharded
safetensors so every test also exercises the index-file path."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (architecture, overrides). Each case stresses one sharding or config path.
TINY_MODELS = {
    "llama_gqa": ("llama", {}),
    "llama_mqa": ("llama", {"num_key_value_heads": 1}),
    "llama_mha_tied_oddvocab": ("llama", {"num_key_value_heads": 8, "tie_word_embeddings": True, "vocab_size": 203}),
    "llama3_rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}}),
    "mistral_swa": ("mistral", {"sliding_window": 12}),
    "qwen2_bias": ("qwen2", {"vocab_size": 250, "num_key_value_heads": 4}),
}


def hf_config(kind: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    return cls(**{**BASE, **overrides})


def build_tiny_model(out_dir: str | Path, name: str, seed: int = 0, max_shard_size: str = "60KB") -> Path:
    """Create (once) and return the checkpoint directory of the named tiny model."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir) / name
    if (out / "config.json").is_file():
        return out
    kind, overrides = TINY_MODELS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    return out


def load_hf(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def build_tiny_model_with_tokenizer(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Llama (GQA) whose vocabulary is the bundled tokenizer's, so text prompts,
    stop strings and text-only protocols can be tested. Skips when the tokenizer is absent."""
    import shutil

    import pytest

    from tpserve.bundled import DEFAULT_MODEL_DIR

    out = Path(out_dir) / "llama_tok"
    if (out / "config.json").is_file():
        return out
    if not (DEFAULT_MODEL_DIR / "tokenizer.model").is_file():
        pytest.skip(f"bundled tokenizer not built in {DEFAULT_MODEL_DIR}")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config("llama", vocab_size=4096), dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="200KB")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEFAULT_MODEL_DIR / name).is_file():
            shutil.copy(DEFAULT_MODEL_DIR / name, out / name)
    return out
