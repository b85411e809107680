"""Split-K epilogue: sum fp32 partial GEMM results, add the bias and cast to the output dtype.

The quantised GEMMs split K across programs when M is small (decode), so a handful of output
tiles still occupies every SM; each split writes its own fp32 partial and this kernel combines
them in a fixed order, keeping results deterministic (unlike atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on, stride_bias,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # SPLIT_K is a small constexpr, so the loop unrolls into SPLIT_K independent loads.
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col * stride_bias, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + col * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """partials fp32 [SPLIT_K, M, N] (contiguous), bias [N] or None, out [M, N] -> out."""
    if partials.dtype != torch.float32 or partials.dim() != 3 or not partials.is_contiguous():
        raise ValueError(f"partials must be contiguous fp32 [SPLIT_K, M, N], got {partials.dtype} "
                         f"{tuple(partials.shape)}")
    split_k, m, n = partials.shape
    if out.shape != (m, n) or out.device != partials.device:
        raise ValueError(f"out must be [{m}, {n}] on {partials.device}, got {tuple(out.shape)} on {out.device}")
    if bias is not None and (bias.shape != (n,) or bias.device != partials.device):
        raise ValueError(f"bias must be [{n}] on {partials.device}, got {tuple(bias.shape)} on {bias.device}")
    grid = (triton.cdiv(m * n, block),)
    _splitk_reduce_kernel[grid](
        partials, bias if bias is not None else partials, out, m, n, out.stride(0), out.stride(1),
        bias.stride(0) if bias is not None else 0,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
    )
    return out
