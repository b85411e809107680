"""Compile every kernel for sm_90 (H100) with its GPU launch configuration, without a GPU.

The interpreter runs kernels as numpy and accepts code the compiler rejects (loop-carried type
changes, dot shapes under 16, bf16 paths it cannot even execute correctly). This script calls each
public wrapper on CPU tensors with JITFunction.run replaced by a recorder, then compiles every
recorded launch to a cubin with Triton's own CUDA backend (ptxas ships in the triton wheel).
Run it in a process WITHOUT TRITON_INTERPRET; prints one line per compiled launch.
"""

import os
import sys
import time

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8",
           torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
launches = []


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def _compile(fn, args, kwargs):
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    signature, constexprs = {}, {}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)


def _calls():
    from tpserve.kernels.flash_prefill import flash_prefill
    from tpserve.kernels.paged_decode import paged_decode_attention
    from tpserve.kernels.w4a16_matmul import w4a16_matmul
    from tpserve.kernels.w8a16_matmul import w8a16_matmul

    bf16 = torch.bfloat16
    k, n = 512, 256
    decode = dict(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4)
    prefill = dict(block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8, num_stages=3)
    x = torch.zeros(16, k, dtype=bf16)
    bias = torch.zeros(n, dtype=bf16)
    yield "w8a16 decode bf16", lambda: w8a16_matmul(x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n), bias, **decode)
    yield "w8a16 prefill bf16", lambda: w8a16_matmul(x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n), **prefill)
    yield "w8a16 prefill fp32", lambda: w8a16_matmul(x.float(), torch.zeros(n, k, dtype=torch.int8), torch.ones(n), **prefill)
    qw, sc, zr = torch.zeros(k // 8, n, dtype=torch.int32), torch.ones(k // 128, n, dtype=bf16), torch.zeros(k // 128, n, dtype=torch.uint8)
    yield "w4a16 decode bf16", lambda: w4a16_matmul(x, qw, sc, zr, 128, bias, **decode)
    yield "w4a16 prefill bf16", lambda: w4a16_matmul(x, qw, sc, zr, 128, **prefill)

    hq, hkv, d, bs = 32, 8, 128, 16
    cache = torch.zeros(64, bs, hkv, d, dtype=bf16)
    # slot_mapping, query_start_loc, seq_lens, block_tables, max_query_len
    index = (torch.zeros(8, dtype=torch.int64), torch.tensor([0, 8], dtype=torch.int32),
             torch.tensor([8], dtype=torch.int32), torch.zeros(1, 64, dtype=torch.int32), 8)
    q, kv = torch.zeros(8, hq, d, dtype=bf16), torch.zeros(8, hkv, d, dtype=bf16)
    attn = dict(block_m=64, block_n=64, num_warps=8, num_stages=3)
    yield "flash_prefill bf16 window", lambda: flash_prefill(q, kv, kv, cache, cache, *index, 0.08, 4096, **attn)
    yield "flash_prefill fp16", lambda: flash_prefill(q.half(), kv.half(), kv.half(), cache.half(), cache.half(), *index, 0.08, **attn)
    qd, tables, lens = torch.zeros(4, hq, d, dtype=bf16), torch.zeros(4, 64, dtype=torch.int32), torch.ones(4, dtype=torch.int32)
    yield "paged_decode bf16 split", lambda: paged_decode_attention(qd, cache, cache, tables, lens, 0.08, None, 256, block_n=64, num_stages=3)
    yield "paged_decode bf16 one-pass window", lambda: paged_decode_attention(qd, cache, cache, tables, lens, 0.08, 128, 1024, block_n=64, num_stages=3)


def main() -> int:
    JITFunction.run = _record
    failures = 0
    for label, call in _calls():
        launches.clear()
        call()
        for fn, args, kwargs in launches:
            t = time.perf_counter()
            try:
                compiled = _compile(fn, args, kwargs)
                print(f"ok   {label}: {fn.__name__} shared={compiled.metadata.shared}B "
                      f"({time.perf_counter() - t:.1f}s)")
            except Exception as e:  # report every failure, not just the first
                failures += 1
                print(f"FAIL {label}: {fn.__name__}: {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
