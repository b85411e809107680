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


# --- Quantised tiny checkpoints -------------------------------------------------------------------
# Reference packers written from the GPTQ / AWQ format descriptions, independent of tpserve.quant,
# so that the loader's conversion is checked against a second implementation.

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_nibbles(vals: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """vals [R, 8C] integers -> int32 [R, C]; nibble p (bits 4p..4p+3) of column c holds
    vals[:, 8c + order[p]] & 0xF."""
    r, c8 = vals.shape
    v = vals.to(torch.int64).reshape(r, c8 // 8, 8)
    acc = torch.zeros(r, c8 // 8, dtype=torch.int64)
    for pos, col in enumerate(order):
        acc |= (v[:, :, col] & 0xF) << (4 * pos)
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def rtn_int4_groups(w: torch.Tensor, group_size: int, sym: bool, g_idx: torch.Tensor | None = None,
                    min_zero: int = 0):
    """Round-to-nearest int4 of w [N, K] with rows of K assigned to groups by g_idx [K] (default
    k // group_size). Scales are rounded to fp16 (as GPTQ/AWQ store them). Returns q [N, K],
    scales fp16 [K // G, N], zeros int64 [K // G, N] and the dequantised w_deq [N, K] fp32."""
    n, k = w.shape
    num_groups = -(-k // group_size)  # the last group may be partial
    g_idx = torch.arange(k) // group_size if g_idx is None else g_idx.long()
    scales = torch.zeros(num_groups, n)
    zeros = torch.zeros(num_groups, n, dtype=torch.int64)
    for g in range(num_groups):
        wg = w[:, g_idx == g].float()
        if sym:
            s, z = wg.abs().amax(1) / 7.0, torch.full((n,), 8)
        else:
            lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
            s = (hi - lo) / 15.0
            z = torch.round(-lo / s.clamp(min=1e-8)).long().clamp(min_zero, 15)
        scales[g], zeros[g] = s.clamp(min=1e-6).half().float(), z
    s_k, z_k = scales[g_idx].t(), zeros[g_idx].t()  # [N, K]
    q = torch.clamp(torch.round(w.float() / s_k) + z_k, 0, 15).long()
    return q, scales.half(), zeros, (q - z_k).float() * s_k


def gptq_tensors(w, group_size, sym, g_idx=None, v2=False):
    """GPTQ tensors of w [N, K] ({qweight, qzeros, scales, g_idx}) and the dequantised weight."""
    k = w.shape[1]
    g = torch.arange(k) // group_size if g_idx is None else g_idx
    # v1 stores zero - 1, so a zero of 0 is not representable there: keep zeros >= 1.
    q, scales, zeros, w_deq = rtn_int4_groups(w, group_size, sym, g, min_zero=0 if v2 else 1)
    stored = zeros if v2 else zeros - 1
    return {
        "qweight": pack_nibbles(q).t().contiguous(),  # packed along K: [K // 8, N]
        "qzeros": pack_nibbles(stored),  # packed along N: [K // G, N // 8]
        "scales": scales,
        "g_idx": g.to(torch.int32),
    }, w_deq


def awq_tensors(w, group_size):
    """AWQ GEMM tensors of w [N, K] ({qweight [K, N // 8], qzeros, scales}) and the dequantised weight."""
    q, scales, zeros, w_deq = rtn_int4_groups(w, group_size, sym=False)
    return {
        "qweight": pack_nibbles(q.t(), AWQ_NIBBLE_ORDER),
        "qzeros": pack_nibbles(zeros, AWQ_NIBBLE_ORDER),
        "scales": scales,
    }, w_deq


def _save_spread(tensors: dict, out: Path, num_files: int = 3) -> None:
    """Round-robin the tensors over several files, so one projection's tensors sit in different files."""
    import json

    from safetensors.torch import save_file

    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{num_files:05d}.safetensors" for i in range(num_files)]
    weight_map = {n: files[i % num_files] for i, n in enumerate(names)}
    for f in files:
        save_file({n: tensors[n].contiguous() for n in names if weight_map[n] == f}, out / f)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_quantized_tiny(out_dir, name: str, fmt: str, group_size: int, sym: bool = False,
                         act_order: bool = False, v2: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """A GPTQ ("gptq") or AWQ ("awq") checkpoint of the named tiny model, and the float checkpoint
    whose projection weights are its dequantised values. Returns (quant_dir, dequant_dir).
    With act_order, each input (attention in, o_proj in, MLP in, down_proj in) gets one random
    g_idx, shared by the projections that read it, as GPTQ produces."""
    import json

    from safetensors.torch import load_file

    src = build_tiny_model(out_dir, name)
    tag = f"{name}-{fmt}-g{group_size}-{'sym' if sym else 'asym'}{'-act' if act_order else ''}{'-v2' if v2 else ''}"
    qdir, ddir = Path(out_dir) / tag, Path(out_dir) / f"{tag}-deq"
    if (qdir / "config.json").is_file():
        return qdir, ddir
    qdir.mkdir(parents=True)
    ddir.mkdir(parents=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    gen = torch.Generator().manual_seed(seed + 1)
    g_idx_of = {}
    quant, deq = {}, {}
    for tname, t in sorted(tensors.items()):
        module, _, leaf = tname.rpartition(".")
        proj = module.rpartition(".")[2]
        if proj not in PROJECTIONS or leaf != "weight":
            quant[tname] = deq[tname] = t
            continue
        if fmt == "awq":
            qt, w_deq = awq_tensors(t, group_size)
        else:
            g_idx = None
            if act_order:
                shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
                key = (module.rpartition(".")[0], shared_input.get(proj, proj))
                if key not in g_idx_of:
                    k = t.shape[1]
                    g_idx_of[key] = (torch.arange(k) // group_size)[torch.randperm(k, generator=gen)]
                g_idx = g_idx_of[key]
            qt, w_deq = gptq_tensors(t, group_size, sym, g_idx, v2)
        for suffix, value in qt.items():
            quant[f"{module}.{suffix}"] = value
        deq[tname] = w_deq
    config = json.loads((src / "config.json").read_text())
    (ddir / "config.json").write_text(json.dumps(config))
    if fmt == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                         "desc_act": act_order, "sym": sym,
                                         "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    (qdir / "config.json").write_text(json.dumps(config))
    _save_spread(quant, qdir)
    _save_spread(deq, ddir, 1)
    return qdir, ddir


def dequantize_int4_ragged(qweight, scales, zeros, group_size):
    """tpserve.ops.quant.dequantize_int4 that also accepts a partial last group (K % G != 0)."""
    from tpserve.ops.quant import unpack_int4

    q = unpack_int4(qweight).float()  # [N, K]
    k = q.shape[1]
    s = scales.float().t().repeat_interleave(group_size, dim=1)[:, :k]
    z = zeros.float().t().repeat_interleave(group_size, dim=1)[:, :k]
    return (q - z) * s
