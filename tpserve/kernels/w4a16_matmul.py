"""W4A16 GEMM: y [M, N] = x [M, K] @ dequantize_int4(qweight, scales, zeros)^T (+ bias [N]).

Specification and weight layout: `tpserve.ops.quant` (qweight int32 [K // 8, N], nibble j of row i
is k = 8*i + j; scales [K // G, N]; zeros uint8 [K // G, N]; w = (q - zero) * scale).

One kernel, two regimes chosen by the wrapper from M (see `kernels._gemm_config`): decode
(M <= 16) uses 16-row tiles and split-K so the weight stream, the real cost, is spread over every
SM; prefill uses large tiles without splitting. BLOCK_K always divides the group size, so every
K tile sits in a single quantisation group and needs one scale row and one zero row.
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
def _w4a16_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on, stride_bias,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped tile order (GROUP_M M-tiles share each weight tile while it is hot in L2).
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # K is a multiple of GROUP_SIZE, hence of BLOCK_K, and splits are whole tiles: no K masks.
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # Nibble j of a word is row 8*i + j: expanding [BLOCK_K // 8, 8, BLOCK_N] and merging the
    # first two axes yields the [BLOCK_K, BLOCK_N] tile in row order, each word loaded once.
    shifts = (tl.arange(0, 8) * 4)[None, :, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None], other=0.0)
        offs_kp = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(qw_ptr + offs_kp[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                         mask=mask_n[None, :], other=0)
        q = tl.reshape((packed[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))
        g = k0 // GROUP_SIZE
        zero = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
        # (q - zero) is an exact small integer; the multiply runs in fp32 and rounds once to x's dtype.
        w = ((q - zero[None, :]).to(tl.float32) * scale.to(tl.float32)[None, :]).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        part_ptrs = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
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
    """x [M, K] (fp16/bf16/fp32), qweight int32 [K // 8, N], scales [K // G, N] (fp32 or x.dtype),
    zeros uint8/int8 [K // G, N], bias [N] (fp32 or x.dtype) -> y [M, N] x.dtype (into `out` if
    given). G = group_size, a multiple of 16 dividing K; block_k must divide G. None block sizes
    come from `pick_gemm_config` (decode vs prefill by M)."""
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES:
        raise ValueError(f"x must be 2-D fp16/bf16/fp32 [M, K], got {tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    if group_size <= 0 or group_size % 16 or k % group_size:
        raise ValueError(f"group_size={group_size} must be a positive multiple of 16 dividing K={k}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != k // 8:
        raise ValueError(f"qweight must be int32 [{k // 8}, N] (K={k}), got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1]
    groups = k // group_size
    if scales.shape != (groups, n) or scales.dtype not in (torch.float32, x.dtype):
        raise ValueError(f"scales must be [{groups}, {n}] fp32 or {x.dtype}, got {tuple(scales.shape)} {scales.dtype}")
    if zeros.shape != (groups, n) or zeros.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"zeros must be uint8 [{groups}, {n}], got {tuple(zeros.shape)} {zeros.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in (torch.float32, x.dtype)):
        raise ValueError(f"bias must be [{n}] fp32 or {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias), ("out", out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if m == 0 or n == 0:
        return out

    cfg = pick_gemm_config(m, n, k, x.device, max_block_k=group_size)
    bm, bn, bk = block_m or cfg.block_m, block_n or cfg.block_n, block_k or cfg.block_k
    if bk < 16 or group_size % bk:
        raise ValueError(f"block_k={bk} must be >= 16 and divide group_size={group_size}")
    split = split_k or cfg.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    partials = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, partials,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=num_warps or cfg.num_warps, num_stages=num_stages or cfg.num_stages,
    )
    if split > 1:
        splitk_reduce(partials, bias, out)
    return out
