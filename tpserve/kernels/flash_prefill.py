"""Flash-attention prefill over packed variable-length sequences with a paged KV cache.

Specification: `tpserve.ops.attention.write_kv_cache` followed by `paged_attention_ref`. Causal,
GQA/MQA (query head h reads kv head h // (Hq / Hkv)), optional sliding window (key allowed iff
q_pos - k_pos < window). Sequence i's q_len = query_start_loc[i+1] - query_start_loc[i] queries
sit at context positions seq_lens[i] - q_len ... seq_lens[i] - 1, so a plain prefill (no prefix),
a chunked prefill over a cached prefix, and a decode-like step are the same code.

Two launches: `_write_kv_kernel` scatters the new K/V to their slots, then `_prefill_kernel`
reads the whole context, prefix and new tokens alike, through the block table. Reading the new
tokens back from the cache (rather than fusing the write) means no program can race another's
write, at the cost of re-reading T * Hkv * D elements that were just written (L2-resident).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A negative slot marks a padding token that owns no cache slot. (The slot is broadcast to
    # the tile before comparing: the interpreter mis-types `tensor_mask & scalar_bool`.)
    slot_tile = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot
    mask = (offs_h[:, None] < NUM_KV) & (offs_d[None, :] < HEAD_DIM) & (slot_tile >= 0)
    blk = slot // CACHE_BLOCK
    off = slot % CACHE_BLOCK
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
    qk_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_bt,
    GQA_GROUP: tl.constexpr, CACHE_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    # The grid is sized for the longest query run; shorter sequences leave programs idle.
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len
    kv_head = head // GQA_GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = prefix + offs_m
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # Keys this tile can see: causal bound from its last row, window bound from its first row.
    hi = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    lo = 0
    if SLIDING:
        lo = tl.maximum(0, prefix + m_block * BLOCK_M - window + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        mask_n = k_pos < hi
        # Per-key block lookup: works for any cache block size relative to BLOCK_N.
        blk = tl.load(table + k_pos // CACHE_BLOCK, mask=mask_n, other=0).to(tl.int64)
        off = k_pos % CACHE_BLOCK
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # Masked loads return 0, never whatever (possibly NaN) sits in unused cache slots.
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kcb + off[:, None] * stride_kcs
                    + kv_head * stride_kch + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        allowed = mask_n[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if SLIDING:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing allowed yet (only padding rows past q_len) must not produce inf - inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vcb + off[:, None] * stride_vcs
                    + kv_head * stride_vch + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Write k, v [T, Hkv, D] into k_cache / v_cache [num_blocks, block_size, Hkv, D] at
    slot_mapping [T], then attend q [T, Hq, D] causally over each sequence's context:
    query_start_loc [S + 1] and seq_lens [S] (int32), block_tables [S, max_blocks] (int32),
    max_query_len the longest query run. Returns out [T, Hq, D] in q.dtype (written into `out`
    when given)."""
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be fp16/bf16/fp32 [T, Hq, D], got {q.dtype} {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_kv, cache_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_dim != head_dim or num_kv == 0 or num_heads % num_kv:
        raise ValueError(f"cache [.., Hkv={num_kv}, D={cache_dim}] does not fit q heads={num_heads}, D={head_dim}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != (num_tokens, num_kv, head_dim):
            raise ValueError(f"{name} must be [{num_tokens}, {num_kv}, {head_dim}], got {tuple(t.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype}/{v_cache.dtype} must match q dtype {q.dtype}")
    index_tensors = {"slot_mapping": slot_mapping, "query_start_loc": query_start_loc, "seq_lens": seq_lens,
                     "block_tables": block_tables}
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out),
                    *index_tensors.items()):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.dim() != 2:
        raise ValueError(f"query_start_loc must be [{num_seqs + 1}] and block_tables 2-D, got "
                         f"{tuple(query_start_loc.shape)} and {tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1 or not query_start_loc.is_contiguous() or not seq_lens.is_contiguous():
        raise ValueError("block_tables rows, query_start_loc and seq_lens must be contiguous")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    _check_last_dim_contiguous(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with contiguous last dim, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if num_tokens == 0:
        return out

    cache_block = k_cache.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV=num_kv, HEAD_DIM=head_dim, CACHE_BLOCK=cache_block,
        BLOCK_H=triton.next_power_of_2(num_kv), BLOCK_D=block_d,
    )

    on_gpu = q.is_cuda
    bm = block_m or (64 if on_gpu else 16)
    bn = block_n or (64 if on_gpu else 16)
    grid = (num_seqs, triton.cdiv(max_query_len, bm), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * math.log2(math.e), sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GQA_GROUP=num_heads // num_kv, CACHE_BLOCK=cache_block, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=bm, BLOCK_N=bn, SLIDING=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps or (4 if block_d <= 64 else 8), num_stages=num_stages or (3 if on_gpu else 1),
    )
    return out
