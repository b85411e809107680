"""Reference weight-only quantisation: the specification the Triton GEMM kernels are tested against.

Weights follow `torch.nn.functional.linear`: a float weight is w [N, K] (out_features, in_features)
and y = x @ w^T. Every reference dequantises in fp32, multiplies in fp32 and casts the result to
x.dtype once, so it is the most exact answer the kernels can be compared with.

INT8 (w8a16), symmetric, per output channel:
    qweight int8 [N, K], values in [-127, 127]
    scale [N] (fp32, or the activation dtype)
    w[n, k] = qweight[n, k] * scale[n]

INT4 (w4a16), group-wise along K, asymmetric (zero point) or symmetric (zero point fixed at 8):
    qweight int32 [K // 8, N]. Column n of row i packs the 8 consecutive input rows k = 8*i + j,
        j = 0..7, as 4-bit unsigned nibbles q in [0, 15]; nibble j occupies bits [4*j, 4*j + 4)
        (low bits first), so q[n, 8*i + j] = (qweight[i, n] >> (4 * j)) & 0xF. Nibble 7 lands in
        the sign bit: the int32 may be negative, which the mask makes harmless.
    scales [K // group_size, N] (fp32, or the activation dtype)
    zeros uint8 [K // group_size, N], one unpacked zero point in [0, 15] per (group, column)
    w[n, k] = (q[n, k] - zeros[k // group_size, n]) * scales[k // group_size, n]
    group_size is 32, 64 or 128 (any multiple of 8 dividing K works in the reference); K must be
    a multiple of group_size. N is unconstrained, because packing runs along K.
The K-major packing lets a GEMM tile load a [BLOCK_K // 8, BLOCK_N] slab coalesced along N, and
one group's scale/zero row serves a whole BLOCK_K tile when BLOCK_K divides group_size.
"""

from __future__ import annotations

import torch

INT4_PACK = 8  # nibbles per int32


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: w [N, K] float -> (qweight int8 [N, K], scale [N] scale_dtype).
    The scale is rounded to scale_dtype before quantising so |w - q * scale| <= scale / 2 holds
    for the scale actually stored."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor [N, K], got {tuple(w.shape)} {w.dtype}")
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(wf / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def w8a16_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ (qweight int8 [N, K] * scale [N, 1])^T + bias [N] -> [M, N] in x.dtype."""
    w = qweight.float() * scale.float()[:, None]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in [0, 15] -> qweight int32 [K // 8, N] in the layout above."""
    n, k = q.shape
    if k % INT4_PACK:
        raise ValueError(f"K={k} must be a multiple of {INT4_PACK} to pack int4")
    nib = q.to(torch.int64).t().reshape(k // INT4_PACK, INT4_PACK, n)  # [K//8, 8, N]
    shifts = torch.arange(INT4_PACK, device=q.device, dtype=torch.int64) * 4
    packed = (nib << shifts[None, :, None]).sum(dim=1)  # [K//8, N], in [0, 2**32)
    # Reinterpret as two's-complement int32 explicitly rather than rely on a narrowing cast.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K // 8, N] -> q int64 [N, K] with values in [0, 15]."""
    kp, n = qweight.shape
    shifts = torch.arange(INT4_PACK, device=qweight.device, dtype=torch.int64) * 4
    nib = (qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF  # [K//8, 8, N]
    return nib.reshape(kp * INT4_PACK, n).t()


def quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool = False, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4: w [N, K] float -> (qweight int32 [K // 8, N], scales [K // g, N]
    scale_dtype, zeros uint8 [K // g, N]).

    Asymmetric: each group's range is widened to include 0, scale = (max - min) / 15 and
    zero = round(-min / scale), so 0 is exactly representable and the zero point never clamps.
    Symmetric: scale = absmax / 7, zero = 8, q = round(w / scale) + 8 (uses [1, 15]).
    Either way |w - dequantised| <= scale / 2 for every element of a group."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor [N, K], got {tuple(w.shape)} {w.dtype}")
    n, k = w.shape
    if group_size <= 0 or group_size % INT4_PACK or k % group_size:
        raise ValueError(f"group_size={group_size} must be a positive multiple of 8 dividing K={k}")
    g = w.float().reshape(n, k // group_size, group_size)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = (g.abs().amax(dim=2) / 7.0).clamp(min=tiny).to(scale_dtype)
        zero = torch.full_like(scale, 8, dtype=torch.float32)
    else:
        lo = g.amin(dim=2).clamp(max=0.0)
        hi = g.amax(dim=2).clamp(min=0.0)
        scale = ((hi - lo) / 15.0).clamp(min=tiny).to(scale_dtype)
        zero = torch.round(-lo / scale.float()).clamp(0, 15)
    q = torch.round(g / scale.float()[:, :, None]) + zero[:, :, None]
    q = q.clamp(0, 15).reshape(n, k)
    qweight = pack_int4(q)
    return qweight, scale.t().contiguous(), zero.t().to(torch.uint8).contiguous()


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(qweight int32 [K // 8, N], scales [K // g, N], zeros [K // g, N]) -> w [N, K] dtype."""
    q = unpack_int4(qweight).float()  # [N, K]
    s = scales.float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    z = zeros.float().t().repeat_interleave(group_size, dim=1)
    return ((q - z) * s).to(dtype)


def w4a16_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantize_int4(...)^T + bias [N] -> [M, N] in x.dtype."""
    w = dequantize_int4(qweight, scales, zeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
