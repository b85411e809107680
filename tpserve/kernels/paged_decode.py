"""Paged decode attention (one query token per sequence), flash-decoding style.

Specification: `paged_attention_ref` with max_query_len == 1 (the new token's K/V is already in
the cache). Sequence b's query sits at position seq_lens[b] - 1 and may see keys
max(0, seq_lens[b] - window) .. seq_lens[b] - 1.

Each program handles one (sequence, kv head, partition of `partition_size` context tokens) and
all Hq / Hkv query heads of that kv head at once, so every K/V tile is loaded once per group
instead of once per query head. Splitting the context into partitions lets one long sequence
occupy many SMs; `_reduce_kernel` merges the partial (max, sum-exp, weighted V) triples. When a
single partition covers every sequence the first kernel normalises and writes `out` directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, window, num_partitions,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_bt,
    GQA_GROUP: tl.constexpr, CACHE_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr,
    SLIDING: tl.constexpr, ONE_PASS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if SLIDING:
        lo = tl.maximum(0, seq_len - window)
    start = tl.maximum(part * PARTITION, lo)
    end = tl.minimum((part + 1) * PARTITION, seq_len)
    # Partitions outside [lo, seq_len) do nothing; the reduce kernel never reads their slots.
    if start >= end:
        return

    offs_g = tl.arange(0, BLOCK_G)  # BLOCK_G >= 16 rows so tl.dot applies; extra rows are q = 0
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GQA_GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GQA_GROUP + offs_g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    # Every key in [start, end) is allowed (causal and window are folded into the bounds),
    # so the only mask is the ragged tail of the last tile.
    for n0 in range(start, end, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = k_pos < end
        blk = tl.load(table + k_pos // CACHE_BLOCK, mask=mask_n, other=0).to(tl.int64)
        off = k_pos % CACHE_BLOCK
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kcb + off[:, None] * stride_kcs
                    + kv_head * stride_kch + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: each tile has >= 1 allowed key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vcb + off[:, None] * stride_vcs
                    + kv_head * stride_vch + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if ONE_PASS:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        # Partials are contiguous [B, Hq, num_partitions(, D)] fp32; m is kept in log2 units.
        row = (seq * GQA_GROUP * tl.num_programs(1) + heads) * num_partitions + part
        tl.store(m_ptr + row, m_i, mask=mask_g)
        tl.store(l_ptr + row, l_i, mask=mask_g)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _reduce_kernel(
    seq_lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, window, num_partitions, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, PARTITION: tl.constexpr,
    SLIDING: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if SLIDING:
        lo = tl.maximum(0, seq_len - window)
    first = lo // PARTITION
    last = tl.cdiv(seq_len, PARTITION)  # exclusive; exactly the partitions that wrote partials
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    base = (seq * tl.num_programs(1) + head) * num_partitions

    # 0-d fp32 tensors (not Python floats) so the loop-carried types stay fixed when compiled.
    m_run = tl.max(tl.full([BLOCK_P], float("-inf"), dtype=tl.float32), axis=0)
    l_run = tl.sum(tl.zeros([BLOCK_P], dtype=tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(first, last, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask_p = parts < last
        m = tl.load(m_ptr + base + parts, mask=mask_p, other=float("-inf"))
        l = tl.load(l_ptr + base + parts, mask=mask_p, other=0.0)
        a = tl.load(acc_ptr + (base + parts)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))  # finite: partition `first` is non-empty
        w = tl.math.exp2(m - m_new)
        alpha = tl.math.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(w * l, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * a, axis=0)
        m_run = m_new
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, (acc / l_run).to(out_ptr.dtype.element_ty),
             mask=mask_d)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    partition_size: int = 512,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence), k_cache / v_cache [num_blocks, block_size, Hkv, D],
    block_tables [B, max_blocks] int32, seq_lens [B] int32 (>= 1, including the new token)
    -> out [B, Hq, D] q.dtype (into `out` when given). max_seq_len (a host int bound on seq_lens)
    sizes the grid; None uses max_blocks * block_size, which needs no device sync."""
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16/bf16/fp32 [B, Hq, D], got {q.dtype} {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, cache_block, num_kv, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_kv == 0 or num_heads % num_kv:
        raise ValueError(f"cache [.., Hkv={num_kv}, D={cache_dim}] does not fit q heads={num_heads}, D={head_dim}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype}/{v_cache.dtype} must match q dtype {q.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [{batch}, max_blocks] with contiguous rows, got {tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,) or not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens must be contiguous [{batch}], got {tuple(seq_lens.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("out", out)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    on_gpu = q.is_cuda
    bn = block_n or (64 if on_gpu else 16)
    if partition_size <= 0 or partition_size % bn:
        raise ValueError(f"partition_size={partition_size} must be a positive multiple of block_n={bn}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with contiguous last dim, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if batch == 0:
        return out

    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * cache_block
    num_partitions = max(1, triton.cdiv(bound, partition_size))
    one_pass = num_partitions == 1
    group = num_heads // num_kv
    block_d = max(16, triton.next_power_of_2(head_dim))
    if one_pass:
        m = l = acc = out  # unused placeholders
    else:
        m = torch.empty((batch, num_heads, num_partitions), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((batch, num_heads, num_partitions, head_dim), dtype=torch.float32, device=q.device)
    qk_scale = scale * math.log2(math.e)
    window = sliding_window or 0
    _partition_kernel[(batch, num_kv, num_partitions)](
        q, k_cache, v_cache, block_tables, seq_lens, out, m, l, acc,
        qk_scale, window, num_partitions,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GQA_GROUP=group, CACHE_BLOCK=cache_block, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=bn, PARTITION=partition_size,
        SLIDING=sliding_window is not None, ONE_PASS=one_pass,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps or 4, num_stages=num_stages or (3 if on_gpu else 1),
    )
    if not one_pass:
        _reduce_kernel[(batch, num_heads)](
            seq_lens, out, m, l, acc, window, num_partitions, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=min(32, triton.next_power_of_2(num_partitions)),
            PARTITION=partition_size, SLIDING=sliding_window is not None, num_warps=4,
        )
    return out
