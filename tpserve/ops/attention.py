"""Reference paged attention: the specification the Triton kernels are tested against.

KV cache layout (per rank, per layer): k_cache and v_cache are [num_blocks, block_size,
num_kv_heads, head_dim]. Token slot s lives at block s // block_size, offset s % block_size.
A batch packs every sequence's new (query) tokens one after another; sequence i's queries are
rows query_start_loc[i]:query_start_loc[i+1] and sit at the last positions of its seq_lens[i]
context tokens, whose K/V are found through block_tables[i].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer.

    slot_mapping [num_tokens] int64: cache slot each new token's K/V is written to.
    query_start_loc [num_seqs + 1] int32; seq_lens [num_seqs] int32 (context incl. new tokens);
    block_tables [num_seqs, max_blocks_per_seq] int32 (unused entries are 0).
    The *_cpu lists mirror the tensors for host-side loops.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new k, v [num_tokens, num_kv_heads, head_dim] at their slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def _attend(q, k, v, q_pos, k_pos, scale, sliding_window):
    """q [Q, H, D], k/v [L, Hkv, D]; positions [Q], [L] -> [Q, H, D]. Query head h uses kv head
    h // (H / Hkv) (grouped inside the fused attention call, K/V are not copied per head)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries q [num_tokens, num_heads, head_dim] over each sequence's
    cached context (which must already include the new tokens' K/V). Returns [num_tokens,
    num_heads, head_dim]."""
    if meta.max_query_len == 1:
        return _decode_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window)
    out = torch.empty_like(q)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        qs, qe = starts[i], starts[i + 1]
        if qe == qs:
            continue
        k = _gather_context(k_cache, meta.block_tables[i], seq_len)
        v = _gather_context(v_cache, meta.block_tables[i], seq_len)
        k_pos = torch.arange(seq_len, device=q.device)
        q_pos = k_pos[seq_len - (qe - qs) :]
        out[qs:qe] = _attend(q[qs:qe], k, v, q_pos, k_pos, scale, sliding_window)
    return out


def _decode_attention_ref(q, k_cache, v_cache, meta, scale, sliding_window):
    """All sequences have exactly one query token: one batched gather, one fused attention call."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    pos = torch.arange(meta.max_seq_len, device=q.device)
    table_cols = (pos // block_size).clamp(max=meta.block_tables.shape[1] - 1)
    slots = meta.block_tables.long()[:, table_cols] * block_size + pos % block_size  # [B, L]
    q_pos = (meta.seq_lens.long() - 1)[:, None]
    allowed = pos[None, :] <= q_pos  # [B, L]
    if sliding_window is not None:
        allowed &= (q_pos - pos[None, :]) < sliding_window
    # Positions past a sequence's end may hold stale or non-finite values; read its position 0
    # there instead (always written), so masked entries never carry NaN into 0 * value.
    slots = torch.where(pos[None, :] <= q_pos, slots, slots[:, :1])
    k = k_cache.view(-1, num_kv, head_dim)[slots].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.view(-1, num_kv, head_dim)[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=allowed[:, None, None, :], scale=scale, enable_gqa=num_heads != num_kv
    )
    return out.view(num_seqs, num_heads, head_dim)
