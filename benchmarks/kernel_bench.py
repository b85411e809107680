"""Kernel roofline benchmark (needs a CUDA GPU): quantised GEMMs and paged decode attention.

GEMMs: the four projections of a 7B Llama layer (qkv 4096->12288, o 4096->4096, gate_up
4096->22016, down 11008->4096) at decode (M = 1, 8, 16) and prefill (M = 512, 2048) sizes, for
the w8a16 kernel, the w4a16 kernel (group 128) and a torch bf16 matmul. Attention: paged decode
at batch 1/8/32 and context 1k/4k/16k. Every rate is set against two measured ceilings: a large
device-to-device copy (bytes read + written per second) and a large bf16 matmul (TFLOP/s).

Timing: CUDA events around each call, L2 flushed before each call (weights must stream from HBM
as in a real layer-by-layer forward), warm-up, median of the repeats. Each kernel is checked once
against its torch reference (max |err| / max |ref| in the `rel_err` column).

    python benchmarks/kernel_bench.py [--repeats 50] [--output out/kernels.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from common import machine_info, print_table, write_json

LLAMA7B_GEMMS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
DECODE_M, PREFILL_M = (1, 8, 16), (512, 2048)


class Timer:
    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # > any L2 today

    def __call__(self, fn) -> float:
        """Median seconds of fn() with a cold L2."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def ceilings(timer: Timer) -> dict:
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_s = timer(lambda: a @ b)
    del src, dst
    return {"copy_GBps": 2 * 2 * 2**30 / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * n**3 / mm_s / 1e12}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)).item()


def bench_gemms(timer: Timer, ceil: dict, dtype: torch.dtype) -> list[dict]:
    from tpserve.kernels.w4a16_matmul import w4a16_matmul
    from tpserve.kernels.w8a16_matmul import w8a16_matmul
    from tpserve.ops.quant import dequantize_int4, quantize_int4, quantize_int8

    rows = []
    for name, (k, n) in LLAMA7B_GEMMS.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        wb = w.to(dtype)
        q8, s8 = quantize_int8(w)
        q4, s4, z4 = quantize_int4(w, 128, scale_dtype=dtype)
        # Each kernel is checked against a plain matmul with its own dequantised weights.
        ref8 = (q8.float() * s8[:, None]).to(dtype)
        ref4 = dequantize_int4(q4, s4, z4, 128, dtype)
        q4_bytes = n * k // 2 + (k // 128) * n * (s4.element_size() + z4.element_size())
        del w
        for m in DECODE_M + PREFILL_M:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            io_bytes = (m * k + m * n) * x.element_size()
            cases = {
                "torch_bf16": (lambda: x @ wb.t(), n * k * wb.element_size(), None),
                "w8a16": (lambda: w8a16_matmul(x, q8, s8), n * k + n * 4, x @ ref8.t()),
                "w4a16": (lambda: w4a16_matmul(x, q4, s4, z4, 128), q4_bytes, x @ ref4.t()),
            }
            for kernel, (fn, weight_bytes, ref) in cases.items():
                sec = timer(fn)
                gbps = (weight_bytes + io_bytes) / sec / 1e9
                tflops = 2 * m * n * k / sec / 1e12
                rows.append({"op": name, "K": k, "N": n, "M": m, "kernel": kernel, "us": sec * 1e6,
                             "GB/s": gbps, "%copy": 100 * gbps / ceil["copy_GBps"], "TFLOP/s": tflops,
                             "%mm": 100 * tflops / ceil["bf16_matmul_TFLOPs"],
                             "rel_err": None if ref is None else _rel_err(fn(), ref)})
        del wb, q8, s8, q4, s4, z4, ref8, ref4
        torch.cuda.empty_cache()
    return rows


def bench_decode_attention(timer: Timer, ceil: dict, dtype: torch.dtype, num_heads: int, num_kv: int) -> list[dict]:
    from tpserve.kernels.paged_decode import paged_decode_attention
    from tpserve.ops.attention import AttentionMetadata, paged_attention_ref

    head_dim, block_size, rows = 128, 16, []
    for batch in (1, 8, 32):
        for ctx in (1024, 4096, 16384):
            blocks = ctx // block_size
            cache = torch.randn(batch * blocks, block_size, num_kv, head_dim, device="cuda", dtype=dtype)
            v_cache = torch.randn_like(cache)
            tables = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, num_heads, head_dim, device="cuda", dtype=dtype)
            fn = lambda: paged_decode_attention(q, cache, v_cache, tables, lens, head_dim**-0.5, max_seq_len=ctx)  # noqa: E731
            sec = timer(fn)
            kv_bytes = 2 * cache.numel() * cache.element_size()
            gbps = (kv_bytes + 2 * q.numel() * q.element_size()) / sec / 1e9
            rel = None
            if batch * ctx <= 8 * 4096:  # the reference gathers the whole context in fp32
                meta = AttentionMetadata(torch.empty(0), torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                                         lens, tables, list(range(batch + 1)), [ctx] * batch, 1, ctx)
                rel = _rel_err(fn(), paged_attention_ref(q, cache, v_cache, meta, head_dim**-0.5))
            rows.append({"op": "paged_decode", "batch": batch, "context": ctx, "heads": f"{num_heads}/{num_kv}",
                         "us": sec * 1e6, "GB/s": gbps, "%copy": 100 * gbps / ceil["copy_GBps"], "rel_err": rel})
            del cache, v_cache
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--heads", type=int, default=32, help="query heads (Llama 7B: 32)")
    p.add_argument("--kv-heads", type=int, default=32, help="kv heads (Llama 7B: 32; 8 for GQA models)")
    p.add_argument("--output", default="out/kernels.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py needs a CUDA GPU (Triton kernels); none found, skipping.")
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    timer = Timer(args.warmup, args.repeats)
    ceil = ceilings(timer)
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s\n")
    gemm_rows = bench_gemms(timer, ceil, dtype)
    print_table(gemm_rows, ["op", "K", "N", "M", "kernel", "us", "GB/s", "%copy", "TFLOP/s", "%mm", "rel_err"])
    print()
    attn_rows = bench_decode_attention(timer, ceil, dtype, args.heads, args.kv_heads)
    print_table(attn_rows, ["op", "batch", "context", "heads", "us", "GB/s", "%copy", "rel_err"])
    write_json(args.output, {"machine": machine_info(), "dtype": args.dtype, "ceilings": ceil,
                             "gemm": gemm_rows, "paged_decode": attn_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
