"""Reading this rank's slice of GPTQ / AWQ / tpserve int4 tensors and converting it to the W4A16
kernel layout of tpserve.ops.quant (qweight int32 [K // 8, N] packed along K, low nibble first;
scales [K // G, N]; zeros uint8 [K // G, N]; w = (q - zero) * scale).

Global checkpoint tensors (K = in_features, N = out_features, G = group_size):

    GPTQ  qweight int32 [K // 8, N]  packed along K, nibble j of row i = input row 8i + j (ours)
          qzeros  int32 [K // G, N // 8]  packed along N, nibble j of column c = output column 8c + j;
                  v1 ("gptq") stores zero - 1 (so a real zero of 0 cannot be stored and reads back
                  as 16, as AutoGPTQ's own kernels compute it), "gptq_v2" stores the zero itself
          scales  fp16 [K // G, N];  g_idx int32 [K], group of each input row
    AWQ   qweight int32 [K, N // 8]  packed along N with nibble p holding column 8c + AWQ_ORDER[p]
          qzeros  int32 [K // G, N // 8]  same interleave;  scales fp16 [K // G, N]

K need not be a multiple of G: the last group may be partial (scales [ceil(K / G), N]), as GPTQ
and AWQ quantisers produce for such K. A shard must still start on a group boundary; only the
shard holding the end of K may end inside a group. The layer pads such a shard to whole groups
with zero-weight rows and pads x with zeros (`pad_last_group`).

Every `read_*` returns an `Int4Shard` in the kernel layout for the rank's ShardPlan: output
columns [out_start, out_start + out_size) (column-parallel, all K rows) or input rows
[in_start, in_start + in_size) (row-parallel, all N columns). Only those ranges are read, except
for N-packed tensors (whole 8-column blocks covering the range) and for GPTQ act-order rows at
TP > 1, whose groups are scattered over K: that shard reads every group's scales and zeros.

Act-order (GPTQ desc_act) with an arbitrary g_idx is turned into contiguous groups by sorting
the shard's rows by group (`act_order_layout`); the layer then gathers x[..., index] before the
matmul. A full-K shard (column-parallel, or TP=1) has exactly G rows per group, so index is a
permutation of K. A row-parallel shard at TP > 1 may hold only part of a group: each group's run
is padded to G rows whose q equals the zero point (weight 0) and whose index points at an extra
zero column appended to x. Memory cost: the padded shard has G rows for every group it touches,
at most min(K // G, K / tp) groups, so up to the whole layer's K rows instead of K / tp, i.e. up
to tp_size times the unpadded int4 weight of o_proj / down_proj on each rank (typical act-order
g_idx touch nearly every group). Column-parallel layers and TP = 1 pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpserve.layers.linear import ShardPlan
from tpserve.layers.sources import TensorSource, check_shape
from tpserve.ops.quant import pack_int4, unpack_int4

GPTQ_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of an AWQ int32 holds column 8c + AWQ_ORDER[p]


class QuantFormatError(ValueError):
    """A quantised checkpoint tensor is inconsistent with its format or with this sharding."""


@dataclass
class Int4Shard:
    """One rank's slice in the kernel layout: qweight [K_l // 8, n], scales fp32 [groups, n],
    zeros uint8 [groups, n] and, for act-order, g_idx [K_l] (global group of each local row; the
    scale/zero rows are then all K // G global groups)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None = None


def unpack_cols(packed: torch.Tensor, order=GPTQ_ORDER) -> torch.Tensor:
    """packed int32 [R, C] (8 nibbles per int32, along the column dim) -> uint8 [R, 8C]."""
    p = packed.to(torch.int64)
    r, c = p.shape
    out = torch.empty(r, c, 8, dtype=torch.uint8)
    for pos, col in enumerate(order):
        out[:, :, col] = ((p >> (4 * pos)) & 0xF).to(torch.uint8)
    return out.reshape(r, 8 * c)


def read_col_range(source: TensorSource, start: int, size: int, order) -> torch.Tensor:
    """Unpacked columns [start, start + size) of an N-packed [R, N // 8] tensor: reads the 8-column
    blocks that cover the range (shards need not start on a block boundary)."""
    c0, c1 = start // 8, -(-(start + size) // 8)
    cols = unpack_cols(source.read(1, c0, c1), order)
    return cols[:, start - 8 * c0 : start - 8 * c0 + size]


def _scales(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)  # fp16/bf16 -> fp32 is exact; the kernels accept fp32 scales


def num_groups(k: int, group: int) -> int:
    return -(-k // group)


def _k_rows(plan: ShardPlan, unit: int) -> tuple[int, int]:
    """[first, end) of the `unit`-row blocks (8-row packs or groups) covering the rank's input
    rows; the shard must start on a block boundary and end on one or at the end of K."""
    end = plan.in_start + plan.in_size
    if plan.in_start % unit or (end % unit and end != plan.in_total):
        raise QuantFormatError(f"input rows [{plan.in_start}, {end}) of {plan.in_total} are not aligned to {unit} rows")
    return plan.in_start // unit, -(-end // unit)


def read_tpserve_int4(src: dict[str, TensorSource], plan: ShardPlan, group: int) -> Int4Shard:
    """tpserve int4: already the kernel layout; column shards read dim 1, row shards dim 0."""
    k, n, gk = plan.in_total, plan.out_total, num_groups(plan.in_total, group)
    check_shape(src["qweight"], (k // 8, n))
    check_shape(src["scales"], (gk, n))
    check_shape(src["zeros"], (gk, n))
    if plan.in_split:
        (q0, q1), (g0, g1) = _k_rows(plan, 8), _k_rows(plan, group)
        parts = src["qweight"].read(0, q0, q1), src["scales"].read(0, g0, g1), src["zeros"].read(0, g0, g1)
    else:
        a, b = plan.out_start, plan.out_start + plan.out_size
        parts = src["qweight"].read(1, a, b), src["scales"].read(1, a, b), src["zeros"].read(1, a, b)
    return Int4Shard(parts[0].to(torch.int32), _scales(parts[1]), parts[2].to(torch.uint8))


def read_gptq(src: dict[str, TensorSource], plan: ShardPlan, group: int, act_order: bool, v2: bool) -> Int4Shard:
    k, n, gk = plan.in_total, plan.out_total, num_groups(plan.in_total, group)
    check_shape(src["qweight"], (k // 8, n))
    check_shape(src["qzeros"], (gk, -(-n // 8)))
    check_shape(src["scales"], (gk, n))
    check_shape(src["g_idx"], (k,))
    if plan.in_split:
        q0, q1 = _k_rows(plan, 8)
        qweight = src["qweight"].read(0, q0, q1)
        g_idx = src["g_idx"].read(0, plan.in_start, plan.in_start + plan.in_size)
        # Act-order rows may belong to any group: keep every group's scale and zero.
        g0, g1 = (0, gk) if act_order else _k_rows(plan, group)
        zeros = unpack_cols(src["qzeros"].read(0, g0, g1))[:, :n]
        scales = src["scales"].read(0, g0, g1)
    else:
        a, b = plan.out_start, plan.out_start + plan.out_size
        qweight = src["qweight"].read(1, a, b)
        g_idx = src["g_idx"].read()
        zeros = read_col_range(src["qzeros"], a, plan.out_size, GPTQ_ORDER)
        scales = src["scales"].read(1, a, b)
    g_idx = g_idx.to(torch.int64)
    if not act_order:
        rows = torch.arange(plan.in_start, plan.in_start + plan.in_size)
        if not torch.equal(g_idx, rows // group):
            raise QuantFormatError(f"{src['g_idx'].name}: g_idx is not k // group_size although desc_act is "
                                   "false; set desc_act=true in quantization_config for act-order checkpoints")
    elif g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= gk):
        raise QuantFormatError(f"{src['g_idx'].name}: g_idx values must lie in [0, {gk})")
    # v1 stores zero - 1; add 1 without wrapping, as AutoGPTQ's kernels do (a stored 15 means 16).
    zeros = zeros if v2 else zeros + 1
    return Int4Shard(qweight.to(torch.int32), _scales(scales), zeros, g_idx if act_order else None)


def read_awq(src: dict[str, TensorSource], plan: ShardPlan, group: int) -> Int4Shard:
    k, n, gk = plan.in_total, plan.out_total, num_groups(plan.in_total, group)
    check_shape(src["qweight"], (k, -(-n // 8)))
    check_shape(src["qzeros"], (gk, -(-n // 8)))
    check_shape(src["scales"], (gk, n))
    if plan.in_split:
        g0, g1 = _k_rows(plan, group)
        q = unpack_cols(src["qweight"].read(0, plan.in_start, plan.in_start + plan.in_size), AWQ_ORDER)[:, :n]
        zeros = unpack_cols(src["qzeros"].read(0, g0, g1), AWQ_ORDER)[:, :n]
        scales = src["scales"].read(0, g0, g1)
    else:
        a, b = plan.out_start, plan.out_start + plan.out_size
        q = read_col_range(src["qweight"], a, plan.out_size, AWQ_ORDER)
        zeros = read_col_range(src["qzeros"], a, plan.out_size, AWQ_ORDER)
        scales = src["scales"].read(1, a, b)
    return Int4Shard(pack_int4(q.t()), _scales(scales), zeros)  # q is [K_l, n]; pack_int4 takes [n, K_l]


def act_order_layout(shard: Int4Shard, group: int, full_k: bool) -> tuple[Int4Shard, torch.Tensor]:
    """Sort an act-order shard's rows by group and pad partial groups (module docstring).

    Returns the shard in contiguous-group layout (qweight [Kp // 8, n], scales / zeros [Kp // G, n],
    g_idx None) and index int64 [Kp]: padded row p takes activation column index[p], where
    index == K_l names the appended zero column."""
    g_idx = shard.g_idx
    k_local = g_idx.numel()
    order = torch.argsort(g_idx, stable=True)
    groups, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
    if full_k:  # every group has G rows, but a partial last group when G does not divide K
        expected = torch.full((num_groups(k_local, group),), group)
        expected[-1] = k_local - group * (expected.numel() - 1)
        if counts.shape != expected.shape or not torch.equal(counts, expected):
            raise QuantFormatError(f"g_idx must give each of the {expected.numel()} groups {group} rows "
                                   f"(the last {int(expected[-1])}); got group sizes {counts.tolist()[:16]}")
    if bool((counts > group).any()):
        raise QuantFormatError(f"g_idx puts more than group_size={group} rows in one group")
    num = groups.numel()
    slot = torch.arange(num).repeat_interleave(counts) * group  # first padded row of each sorted row's group
    within = torch.arange(k_local) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    index = torch.full((num * group,), k_local, dtype=torch.int64)
    index[slot + within] = order
    q = unpack_int4(shard.qweight)  # [n, K_l]
    zeros, scales = shard.zeros[groups], shard.scales[groups]  # [num, n]
    q_ext = torch.cat([q, torch.zeros(q.shape[0], 1, dtype=q.dtype)], dim=1)[:, index]  # [n, Kp]
    pad = index == k_local
    if bool(pad.any()):
        # Padding rows hold the group's zero point, so their weight is exactly 0. (A GPTQ v1 zero
        # of 16 cannot be stored in 4 bits: 15 gives weight -scale, still times a zero activation.)
        pad_group = torch.arange(num * group)[pad] // group
        q_ext[:, pad] = zeros[pad_group].t().clamp(max=15).to(q_ext.dtype)
    return Int4Shard(pack_int4(q_ext), scales, zeros), index


def pad_last_group(shard: Int4Shard, group: int) -> Int4Shard:
    """Extend a shard whose K_l rows end inside its last group to whole groups: the added rows
    hold the last group's zero point (weight exactly 0); the layer pads x with zeros to match."""
    k_local = shard.qweight.shape[0] * 8
    extra = shard.scales.shape[0] * group - k_local
    if extra == 0:
        return shard
    pad_q = shard.zeros[-1].clamp(max=15).to(torch.int64)[:, None].expand(-1, extra)  # [n, extra]
    qweight = torch.cat([shard.qweight, pack_int4(pad_q)], dim=0)
    return Int4Shard(qweight, shard.scales, shard.zeros, shard.g_idx)
