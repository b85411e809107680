"""W8A16 GEMM: y [M, N] = x [M, K] @ (qweight int8 [N, K] * scale [N])^T (+ bias [N]).

Specification: `tpserve.ops.quant.w8a16_matmul_ref`. The int8 weight tile is converted to the
activation dtype inside the kernel (exact: |q| <= 127) and fed to tl.dot with fp32 accumulation;
the per-output-channel scale is constant along K, so it is applied once to the accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gemm_config import pick_gemm_config
from ._tiles import grouped_tile
from .splitk_reduce import splitk_reduce

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_scale, stride_bias,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        else:
            mask_k = offs_k < k_end
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :] & mask_k[:, None], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    acc *= tl.load(scale_ptr + offs_n * stride_scale, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        part_ptrs = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def w8a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32), qweight int8 [N, K], scale [N] (fp32 or x.dtype), bias [N]
    (fp32 or x.dtype) -> y [M, N] x.dtype, written into `out` when given. Block sizes / split_k
    left as None come from `pick_gemm_config` (decode vs prefill by M)."""
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES:
        raise ValueError(f"x must be 2-D fp16/bf16/fp32 [M, K], got {tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"qweight must be int8 [N, {k}], got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if scale.shape != (n,) or scale.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"scale must be [{n}] fp32 or {x.dtype}, got {tuple(scale.shape)} {scale.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in (torch.float32, x.dtype)):
        raise ValueError(f"bias must be [{n}] fp32 or {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("qweight", qweight), ("scale", scale), ("bias", bias), ("out", out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))

    cfg = pick_gemm_config(m, n, k, x.device)
    bm, bn, bk = block_m or cfg.block_m, block_n or cfg.block_n, block_k or cfg.block_k
    split = split_k or cfg.split_k
    # Each split covers a whole number of BLOCK_K tiles so only the last split can be ragged.
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    partials = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _w8a16_kernel[grid](
        x, qweight, scale, bias if bias is not None else scale, out, partials,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1),
        scale.stride(0), bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, SPLIT_K=split, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=num_warps or cfg.num_warps, num_stages=num_stages or cfg.num_stages,
    )
    if split > 1:
        splitk_reduce(partials, bias, out)
    return out
