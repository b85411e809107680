"""Batch-1 decode of a 7B-shaped Llama with random weights in bf16, int8 and int4 (g128), against
the memory-bandwidth roofline: every decode step reads all weights once, so the floor of a step is
weight bytes / measured device-copy bandwidth. Reports tokens/s and achieved GB/s (weight bytes x
steps/s) as a fraction of the copy bandwidth. Needs a CUDA GPU for meaningful numbers;
`--shape tiny --device cpu` runs the same code path on a toy shape as a smoke test.

    python benchmarks/model_decode.py [--context 512] [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import machine_info, print_table, write_json

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024),
}
QUANT = {"bf16": None, "int8": {"quant_method": "tpserve", "bits": 8},
         "int4-g128": {"quant_method": "tpserve", "bits": 4, "group_size": 128, "sym": False}}


def build(shape: str, variant: str, device: torch.device, dtype: torch.dtype):
    from tpserve.config import ModelConfig
    from tpserve.distributed import TPGroup
    from tpserve.models import build_model
    from tpserve.quant.methods import quant_method_for

    hf = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, **SHAPES[shape]}
    if QUANT[variant]:
        hf["quantization_config"] = QUANT[variant]
    cfg = ModelConfig.from_hf(hf, dtype)
    model = build_model(cfg, TPGroup(device=device), quant_method_for(cfg))
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.uniform_(0.001, 0.02, generator=gen) if p.dim() == 1 and p.numel() != cfg.hidden_size else \
                    p.normal_(0, 0.02, generator=gen)
            elif p.dtype == torch.uint8:
                p.random_(0, 16, generator=gen)
            else:
                p.random_(generator=gen)
    return cfg, model


def weight_bytes(model, cfg) -> int:
    """Bytes one decode step reads: every parameter except the embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    if cfg.tie_word_embeddings:
        return total
    return total - emb.numel() * emb.element_size()


def step_seconds(model, cfg, device, dtype, context: int, steps: int) -> float:
    from tpserve.ops.attention import AttentionMetadata

    block = 16
    num_blocks = -(-(context + 1) // block)
    attn = model.model.layers[0].self_attn.attn
    shape = (num_blocks, block, attn.num_kv_heads, attn.head_dim)
    caches = [(torch.randn(shape, dtype=dtype, device=device) * 0.1, torch.randn(shape, dtype=dtype, device=device) * 0.1)
              for _ in range(cfg.num_hidden_layers)]
    ints = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([context], dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, 1], **ints), seq_lens=torch.tensor([context + 1], **ints),
        block_tables=torch.arange(num_blocks, **ints)[None], query_start_loc_cpu=[0, 1],
        seq_lens_cpu=[context + 1], max_query_len=1, max_seq_len=context + 1)
    ids = torch.tensor([5], device=device)
    pos = torch.tensor([context], device=device)

    def one():
        with torch.inference_mode():
            hidden = model(ids, pos, caches, meta)
            return model.compute_logits(hidden)

    for _ in range(3):
        one()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        one()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    n = 2 * 2**30 if device.type == "cuda" else 256 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(QUANT))
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--output", default="out/model_decode.json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and args.shape == "7b":
        print("a 7B-shaped model needs a CUDA GPU; use --shape tiny --device cpu for a smoke run. Skipping.")
        return
    bw = copy_bandwidth(device)
    rows = []
    for variant in args.variants:
        cfg, model = build(args.shape, variant, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        secs = step_seconds(model, cfg, device, cfg.dtype, args.context, args.steps)
        nbytes = weight_bytes(model, cfg)
        label = variant if device.type == "cuda" or variant != "bf16" else "float32"
        rows.append({"variant": label, "weight_GB": nbytes / 1e9, "step_ms": secs * 1e3, "tok_per_s": 1 / secs,
                     "GBps": nbytes / secs / 1e9, "frac_of_copy_bw": nbytes / secs / bw,
                     "roofline_tok_per_s": bw / nbytes})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["tok_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["tok_per_s"] / base
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s\n")
    print_table(rows, ["variant", "weight_GB", "step_ms", "tok_per_s", "roofline_tok_per_s", "GBps",
                       "frac_of_copy_bw", "speedup_vs_first"])
    write_json(args.output, {"shape": args.shape, "context": args.context, "copy_GBps": bw / 1e9, "rows": rows,
                             "machine": machine_info()})


if __name__ == "__main__":
    main()
