"""Reference paged attention: the specification the Triton kernels are tested against.

KV cache layout (per rank, per layer): k_cache and v_cache are [num_blocks, block_size,
num_kv_heads, head_dim]. Token slot s lives at block s // block_size, offset s % block_size.
A batch packs every sequence's new (query) tokens one after another; sequence i's queries are
rows query_start_loc[i]:query_start_loc[i+1] and sit at the last positions of its seq_lens[i]
context tokens, whose K/V are found through block_tables[i].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Sequences with at most this many query rows (decodes, speculative verification) are attended in
# one batched gather + fused call; longer ones (prefill chunks) one sequence at a time.
SHORT_QUERY_LEN = 16


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer.

    slot_mapping [num_tokens] int64: cache slot each new token's K/V is written to.
    query_start_loc [num_seqs + 1] int32; seq_lens [num_seqs] int32 (context incl. new tokens);
    block_tables [num_seqs, max_blocks_per_seq] int32 (unused entries are 0).
    The *_cpu lists mirror the tensors for host-side loops. `derived` memoises per-step index
    tensors that every layer would otherwise rebuild (filled by the attention implementation).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    derived: dict = field(default_factory=dict, repr=False, compare=False)

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


@dataclass
class _ShortPlan:
    """Index tensors for the batched path over S short sequences with at most Q query rows each
    and contexts of at most L tokens."""

    rows: torch.Tensor  # [S, Q] query row of each (sequence, query); padding repeats the last row
    slots: torch.Tensor  # [S, L] cache slot of each context position (position 0's past the end)
    allowed: torch.Tensor  # [S, 1, Q, L] causal (and sliding-window) mask
    out_rows: torch.Tensor | None  # rows of the output the valid entries fill; None: all, in order
    valid: torch.Tensor | None  # [S, Q] which entries are real queries; None: all


def _short_plan(meta: AttentionMetadata, block_size: int, sliding_window: int | None, device):
    starts = meta.query_start_loc_cpu
    seqs = [i for i in range(meta.num_seqs) if 0 < starts[i + 1] - starts[i] <= SHORT_QUERY_LEN]
    if not seqs:
        return None
    q_lens = [starts[i + 1] - starts[i] for i in seqs]
    max_q = max(q_lens)
    rows = [[starts[i] + min(j, n - 1) for j in range(max_q)] for i, n in zip(seqs, q_lens)]
    max_len = max(meta.seq_lens_cpu[i] for i in seqs)
    index = torch.tensor(seqs, dtype=torch.long, device=device)
    seq_lens = meta.seq_lens.long()[index]
    pos = torch.arange(max_len, device=device)
    table_cols = (pos // block_size).clamp(max=meta.block_tables.shape[1] - 1)
    slots = meta.block_tables.long()[index][:, table_cols] * block_size + pos % block_size  # [S, L]
    # Positions past a sequence's end may hold stale or non-finite values; read its position 0
    # there instead (always written), so masked entries never carry NaN into 0 * value.
    slots = torch.where(pos[None, :] < seq_lens[:, None], slots, slots[:, :1])
    q_len_t = torch.tensor(q_lens, device=device)
    offset = torch.arange(max_q, device=device).clamp(max=q_len_t[:, None] - 1)  # [S, Q]
    q_pos = seq_lens[:, None] - q_len_t[:, None] + offset
    allowed = pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= (q_pos[:, :, None] - pos[None, None, :]) < sliding_window
    in_order = len(seqs) == meta.num_seqs and all(n == max_q for n in q_lens)
    valid = None if in_order else torch.arange(max_q, device=device)[None, :] < q_len_t[:, None]
    out_rows = None
    if valid is not None:
        out_rows = torch.tensor([starts[i] + j for i, n in zip(seqs, q_lens) for j in range(n)],
                                dtype=torch.long, device=device)
    return _ShortPlan(torch.tensor(rows, dtype=torch.long, device=device), slots, allowed[:, None],
                      out_rows, valid)


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
    num_heads, head_dim].

    Sequences with few queries (decode, speculative verification) share one gather and one fused
    attention call per layer, with the index tensors built once per step; prefill chunks are
    attended one sequence at a time."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    key = ("ref", block_size, sliding_window, q.device)
    if key not in meta.derived:
        meta.derived[key] = _short_plan(meta, block_size, sliding_window, q.device)
    plan = meta.derived[key]
    out = None
    if plan is not None:
        k = k_cache.view(-1, num_kv, head_dim)[plan.slots].transpose(1, 2)  # [S, Hkv, L, D]
        v = v_cache.view(-1, num_kv, head_dim)[plan.slots].transpose(1, 2)
        short = F.scaled_dot_product_attention(
            q[plan.rows].transpose(1, 2), k, v, attn_mask=plan.allowed, scale=scale,
            enable_gqa=num_heads != num_kv,
        ).transpose(1, 2)  # [S, Q, H, D]
        if plan.valid is None:
            return short.reshape(num_tokens, num_heads, head_dim)
        out = q.new_empty(q.shape)
        out[plan.out_rows] = short[plan.valid]
    if out is None:
        out = torch.empty_like(q)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        qs, qe = starts[i], starts[i + 1]
        if qe - qs <= SHORT_QUERY_LEN:
            continue
        k = _gather_context(k_cache, meta.block_tables[i], seq_len)
        v = _gather_context(v_cache, meta.block_tables[i], seq_len)
        k_pos = torch.arange(seq_len, device=q.device)
        q_pos = k_pos[seq_len - (qe - qs) :]
        out[qs:qe] = _attend(q[qs:qe], k, v, q_pos, k_pos, scale, sliding_window)
    return out
