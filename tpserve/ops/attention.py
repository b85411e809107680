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
    `rows` is the step's plan over the contiguous K/V rows (tpserve.ops.kv_rows) when the runner
    keeps them; block_tables may then be empty.
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
    rows: object = None  # tpserve.ops.kv_rows.RowsStep when the CPU path reads contiguous rows

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


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Query positions [..., Q], key positions [L] -> mask [..., Q, L]: causal, and within the
    sliding window when there is one."""
    allowed = k_pos <= q_pos[..., None]
    if sliding_window is not None:
        allowed &= (q_pos[..., None] - k_pos) < sliding_window
    return allowed


def _attend(q, k, v, q_pos, k_pos, scale, sliding_window):
    """q [Q, H, D], k/v [L, Hkv, D]; positions [Q], [L] -> [Q, H, D]. Query head h uses kv head
    h // (H / Hkv) (grouped inside the fused attention call, K/V are not copied per head)."""
    allowed = _allowed(q_pos, k_pos, sliding_window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


@dataclass
class _Group:
    """Index tensors for S short sequences with exactly Q query rows each and contexts of at most
    L tokens: one gather and one fused attention call per layer."""

    rows: torch.Tensor | None  # [S * Q] query rows, sequence by sequence; None: all rows, in order
    slots: torch.Tensor  # [S, L] cache slot of each context position (position 0's past the end)
    allowed: torch.Tensor  # [S, 1, Q, L] causal (and sliding-window) mask
    num_queries: int


# A group of short sequences pads every context to its longest; splitting it into buckets of similar
# lengths saves that padding's gather and attention at the price of one more gather and fused call
# per bucket and layer, worth about this many padded context positions.
BUCKET_COST_POSITIONS = 1024
MAX_BUCKETS = 4


def equal_count_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Contiguous [a, b) runs of `lengths` (in the given order), at most MAX_BUCKETS: of the
    equal-count splits into 1..MAX_BUCKETS runs, the one with the fewest padded positions (each run
    padded to its longest) plus BUCKET_COST_POSITIONS per run beyond the first."""
    n = len(lengths)
    best, best_cost = [(0, n)], n * max(lengths)
    for k in range(2, min(MAX_BUCKETS, n) + 1):
        cuts = [round(j * n / k) for j in range(k + 1)]
        runs = list(zip(cuts, cuts[1:]))
        cost = sum((b - a) * max(lengths[a:b]) for a, b in runs) + (k - 1) * BUCKET_COST_POSITIONS
        if cost < best_cost:
            best, best_cost = runs, cost
    return best


def _length_buckets(seqs: list[int], seq_lens: list[int]) -> list[list[int]]:
    """`seqs` split into at most MAX_BUCKETS runs of similar context length: equal_count_runs of
    the length-sorted list. Each run keeps the sequences' batch order."""
    if len(seqs) < 2:
        return [seqs]
    ordered = sorted(seqs, key=lambda i: seq_lens[i])
    runs = equal_count_runs([seq_lens[i] for i in ordered])
    return [sorted(ordered[a:b]) for a, b in runs] if len(runs) > 1 else [seqs]


def _short_groups(meta: AttentionMetadata, block_size: int, sliding_window: int | None, device) -> list[_Group]:
    """Short sequences grouped by query length (decodes: 1, verifications: k + 1), so that no group
    pads its queries, and each such group split by context length (_length_buckets), so that little
    of its gather and attention goes to padding."""
    starts = meta.query_start_loc_cpu
    by_len: dict[int, list[int]] = {}
    for i in range(meta.num_seqs):
        n = starts[i + 1] - starts[i]
        if 0 < n <= SHORT_QUERY_LEN:
            by_len.setdefault(n, []).append(i)
    groups = []
    table = meta.block_tables.long()
    buckets = [(n, run) for n, seqs in sorted(by_len.items()) for run in _length_buckets(seqs, meta.seq_lens_cpu)]
    for n, seqs in buckets:
        everything = len(seqs) == meta.num_seqs  # then rows are 0..T-1 in order
        index = None if everything else torch.tensor(seqs, dtype=torch.long, device=device)
        seq_lens = meta.seq_lens.long() if everything else meta.seq_lens.long()[index]
        max_len = max(meta.seq_lens_cpu[i] for i in seqs)
        pos = torch.arange(max_len, device=device)
        tables = table if everything else table[index]
        slots = tables[:, pos // block_size] * block_size + pos % block_size  # [S, L]
        # Positions past a sequence's end may hold stale or non-finite values; read its position
        # 0 there instead (always written), so masked entries never carry NaN into 0 * value.
        slots = torch.where(pos[None, :] < seq_lens[:, None], slots, slots[:, :1])
        q_pos = seq_lens[:, None] - n + torch.arange(n, device=device)[None, :]  # [S, Q]
        allowed = _allowed(q_pos, pos, sliding_window)  # [S, Q, L]
        rows = None if everything else torch.tensor(
            [starts[i] + j for i in seqs for j in range(n)], dtype=torch.long, device=device)
        groups.append(_Group(rows, slots, allowed[:, None], n))
    return groups


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

    Sequences with few queries (decode, speculative verification) are grouped by query count;
    each group takes one gather and one fused attention call per layer, with the index tensors
    built once per step. Prefill chunks are attended one sequence at a time."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    key = ("ref", block_size, sliding_window, q.device)
    if key not in meta.derived:
        meta.derived[key] = _short_groups(meta, block_size, sliding_window, q.device)
    groups = meta.derived[key]
    everything_short = len(groups) == 1 and groups[0].rows is None
    out = None if everything_short else torch.empty_like(q)
    for g in groups:
        k = k_cache.view(-1, num_kv, head_dim)[g.slots].transpose(1, 2)  # [S, Hkv, L, D]
        v = v_cache.view(-1, num_kv, head_dim)[g.slots].transpose(1, 2)
        q_g = (q if g.rows is None else q[g.rows]).view(-1, g.num_queries, num_heads, head_dim)
        short = F.scaled_dot_product_attention(
            q_g.transpose(1, 2), k, v, attn_mask=g.allowed, scale=scale, enable_gqa=num_heads != num_kv,
        ).transpose(1, 2).reshape(-1, num_heads, head_dim)  # [S * Q, H, D]
        if everything_short:
            return short
        out[g.rows] = short
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
