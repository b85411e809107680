"""Contiguous K/V rows: the CPU attention path's per-sequence copy of the paged cache.

The paged cache stays the source of truth (prefix caching, preemption, speculation and the
Triton kernels all work on blocks). On CPU, attention reading it must first gather every
sequence's blocks into one tensor, per layer and per step: at batch 64 that copy was about half of
a decode step. Here each sequence that runs in consecutive steps owns a row of

    k[layer], v[layer]: [rows, num_kv_heads, capacity, head_dim]

holding its context contiguously. A step writes its new tokens' K/V into the rows as well as into
the blocks, so the rows only ever append; a sequence that joins (new, resumed, or absent from the
previous step) has its cached prefix copied from the blocks once. Attention then reads views of
the rows: no copy per layer.

Sequences that attend the same way (the same number of query rows) sit in adjacent rows sorted by
context length, so a bucket of similar lengths is a row range [start, stop) and its K/V a view
k[start:stop, :, :length]. Rows are re-laid out (moving whole rows, once) only when the padding
that saves over RELAYOUT_HORIZON steps outweighs the copying.

Every position a bucket reads is finite: rows start zeroed, and when a row changes hands its
positions past the new owner's context are zeroed, so padding (masked) never carries a stale NaN
into 0 * value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tpserve.ops.attention import BUCKET_COST_POSITIONS, SHORT_QUERY_LEN, _allowed, _attend, equal_count_runs

# A re-layout copies rows once (every layer, K and V) to save padded attention (every layer) on each
# later step; it is worth it when the positions saved over RELAYOUT_HORIZON steps exceed those
# copied times COPY_COST (on this CPU a copied position costs about 2 padded attention positions).
RELAYOUT_HORIZON = 8
COPY_COST = 2
MIN_ROWS, MIN_CAPACITY = 8, 256


@dataclass
class RowBucket:
    """S sequences in rows [start, stop), each with `num_queries` query rows and at most `length`
    context positions: one fused attention call over views of the rows."""

    start: int
    stop: int
    length: int
    num_queries: int
    token_rows: torch.Tensor  # [S * Q] the query rows of the packed batch, row by row
    q_pos: torch.Tensor  # [S, Q] the queries' positions


@dataclass
class RowsStep:
    """One step's use of the rows, shared by every layer."""

    write_index: torch.Tensor  # [T * Hkv] flat index into k.view(-1, D) for each new (token, head)
    buckets: list[RowBucket]
    long_seqs: list[tuple[int, int, int, int]]  # (row, first query row, end query row, context length)
    masks: dict = field(default_factory=dict, repr=False)  # per bucket and sliding window (and groups)

    def allowed(self, i: int, sliding_window: int | None) -> torch.Tensor:
        """Bucket i's boolean mask [S, 1, Q, length]: where each query may attend."""
        key = (i, sliding_window)
        if key not in self.masks:
            b = self.buckets[i]
            k_pos = torch.arange(b.length, device=b.q_pos.device)
            self.masks[key] = _allowed(b.q_pos, k_pos, sliding_window)[:, None]
        return self.masks[key]

    def additive(self, i: int, sliding_window: int | None, groups: int) -> torch.Tensor:
        """Bucket i's additive mask [S, 1, groups * Q, length]: 0 where a query may attend, -inf
        elsewhere; rows ordered (query head within its KV group, query)."""
        key = (i, sliding_window, groups)
        if key not in self.masks:
            allowed = self.allowed(i, sliding_window)  # [S, 1, Q, L]
            s, _, q, n = allowed.shape
            add = torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))
            self.masks[key] = add[:, :, None].expand(s, 1, groups, q, n).reshape(s, 1, groups * q, n)
        return self.masks[key]


def _segments(layout: list[int | None], kind: dict[int, int]):
    """Maximal runs of adjacent rows whose sequences attend with the same query count: (query
    count, first row, [sequence per row])."""
    out, i = [], 0
    while i < len(layout):
        s = layout[i]
        if s is None or kind[s] > SHORT_QUERY_LEN:
            i += 1
            continue
        j = i
        while j < len(layout) and layout[j] is not None and kind[layout[j]] == kind[s]:
            j += 1
        out.append((kind[s], i, layout[i:j]))
        i = j
    return out


def _cost(layout: list[int | None], kind: dict[int, int], seq_len: dict[int, int]) -> int:
    total = 0
    for _, _, seqs in _segments(layout, kind):
        lengths = [seq_len[s] for s in seqs]
        runs = equal_count_runs(lengths)
        total += sum((b - a) * max(lengths[a:b]) for a, b in runs) + len(runs) * BUCKET_COST_POSITIONS
    return total


class KVRows:
    """The rows of one runner (every layer), grown on demand up to `max_rows` x `max_len`."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_rows: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, budget_bytes: int | None = None) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_rows, self.max_len, self.dtype, self.device = max_rows, max_len, dtype, device
        self.budget_bytes = budget_bytes  # None: no limit
        self.position_bytes = 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.over_budget_steps = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows = self.capacity = 0
        self.layout: list[int | None] = []  # sequence id per row (None: free)
        self.valid: dict[int, int] = {}  # sequence id -> context positions its row holds
        self.dirty: list[int] = []  # per row: positions that may hold a previous owner's values
        self.relayouts = 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    # --- storage ----------------------------------------------------------------------------
    def _fits(self, rows: int, capacity: int) -> bool:
        return self.budget_bytes is None or rows * capacity * self.position_bytes <= self.budget_bytes

    def _grow(self, rows: int, length: int) -> bool:
        """Make room for `rows` rows of `length` positions; False when that exceeds the budget."""
        if rows <= self.rows and length <= self.capacity:
            return True
        new_rows = min(self.max_rows, max(rows, MIN_ROWS, 2 * self.rows if rows > self.rows else self.rows))
        new_cap = min(self.max_len, max(length, MIN_CAPACITY, 2 * self.capacity if length > self.capacity
                                        else self.capacity))
        if not self._fits(new_rows, new_cap):  # no headroom: exactly what is needed, if that fits
            new_rows, new_cap = max(rows, self.rows), max(length, self.capacity)
            if not self._fits(new_rows, new_cap):
                return False
        shape = (new_rows, self.num_kv_heads, new_cap, self.head_dim)
        first = not self.k
        for store in (self.k, self.v):
            for i in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if first:
                    store.append(fresh)
                else:
                    fresh[: self.rows, :, : self.capacity] = store[i]
                    store[i] = fresh
        self.dirty += [0] * (new_rows - self.rows)
        self.rows, self.capacity = new_rows, new_cap
        return True

    def _forget(self) -> None:
        """Release every row (their sequences refill from the blocks when they next fit)."""
        self.layout, self.valid = [], {}

    def release(self, seq_id: int) -> None:
        """The sequence left (finished, preempted, handed over): its row is free."""
        if self.valid.pop(seq_id, None) is not None:
            self.layout[self.layout.index(seq_id)] = None

    def _zero(self, row: int, start: int) -> None:
        """Zero `row` from `start` up to what a previous owner may have left there."""
        if self.dirty[row] > start:
            for t in self.k + self.v:
                t[row, :, start : self.dirty[row]] = 0
        self.dirty[row] = start

    # --- per step ---------------------------------------------------------------------------
    def prepare(self, seq_ids: list[int], num_computed: list[int], num_new: list[int],
                tables: list[list[int]], block_size: int,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> RowsStep | None:
        """Give every sequence of the step a row holding its first `num_computed` positions (copying
        from the blocks what the row lacks), re-lay rows out when that pays, and build the step's
        write index and buckets. None when the rows this step needs exceed the memory budget: the
        step then attends the blocks (paged_attention_ref) and every row is released."""
        present = set(seq_ids)
        for r, s in enumerate(self.layout):
            if s is not None and s not in present:  # absent from this step: its row is released
                self.layout[r] = None
                del self.valid[s]
        while self.layout and self.layout[-1] is None:
            self.layout.pop()
        seq_len = {s: c + n for s, c, n in zip(seq_ids, num_computed, num_new)}
        kind = dict(zip(seq_ids, num_new))
        if not self._grow(len(seq_ids), max(seq_len.values())):
            self._forget()  # every row is released: storage of exactly this step's shape, if that fits
            if not self._fits(len(seq_ids), max(seq_len.values())):
                self.over_budget_steps += 1
                return None
            self.k, self.v, self.dirty, self.rows, self.capacity = [], [], [], 0, 0
            self._grow(len(seq_ids), max(seq_len.values()))
        joining = [s for s in seq_ids if s not in self.valid]
        free = [r for r, s in enumerate(self.layout) if s is None]
        for s in joining:
            r = free.pop(0) if free else len(self.layout)
            if r == len(self.layout):
                self.layout.append(None)
            self.layout[r] = s
            self.valid[s] = 0
        new_owner = set(joining)
        if not self._grow(len(self.layout), 0):  # holes put joiners past the budget: start afresh
            self.layout, self.valid = list(seq_ids), dict.fromkeys(seq_ids, 0)
            new_owner = set(seq_ids)
        new_owner |= self._maybe_relayout(seq_ids, kind, seq_len)
        row_of = {s: r for r, s in enumerate(self.layout) if s is not None}
        for s, c, table in zip(seq_ids, num_computed, tables):
            r = row_of[s]
            if self.valid[s] < c:
                self._fill(r, self.valid[s], c, table, block_size, kv_caches)
            if s in new_owner:  # past its context, nothing another sequence left (its own stale
                self._zero(r, seq_len[s])  # positions, e.g. rejected proposals, only it reads)
            self.valid[s] = seq_len[s]
        return self._step(seq_ids, num_computed, num_new, row_of, seq_len, kind)

    def _fill(self, row: int, start: int, end: int, table: list[int], block_size: int, kv_caches) -> None:
        """Copy positions [start, end) of a sequence's context from its blocks into `row`."""
        pos = torch.arange(start, end)
        slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        for i, (k_cache, v_cache) in enumerate(kv_caches):
            flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
            flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
            self.k[i][row, :, start:end] = flat_k[slots].transpose(0, 1)
            self.v[i][row, :, start:end] = flat_v[slots].transpose(0, 1)
        self.dirty[row] = max(self.dirty[row], end)

    def _maybe_relayout(self, seq_ids: list[int], kind: dict[int, int], seq_len: dict[int, int]) -> set[int]:
        """Move rows into the sorted layout (short sequences grouped by query count, each group by
        context length, longest first; then the long ones) when that pays: when the padded
        positions it saves over RELAYOUT_HORIZON steps exceed the positions it copies. Returns the
        sequences moved."""
        target = sorted(seq_ids, key=lambda s: (kind[s] > SHORT_QUERY_LEN, kind[s], -seq_len[s], s))
        current = self.layout
        if current[: len(target)] == target:
            return set()
        old_row = {s: r for r, s in enumerate(current) if s is not None}
        moves = [(old_row[s], r) for r, s in enumerate(target) if old_row[s] != r]
        length = max(self.valid[current[a]] for a, _ in moves)
        saved = _cost(current, kind, seq_len) - _cost(target, kind, seq_len)
        if saved * RELAYOUT_HORIZON <= COPY_COST * len(moves) * length:
            return set()
        if length:
            src = torch.tensor([a for a, _ in moves])
            dst = torch.tensor([b for _, b in moves])
            for t in self.k + self.v:
                t[dst, :, :length] = t[src, :, :length]
            for _, b in moves:  # prepare() zeroes each row past its context
                self.dirty[b] = max(self.dirty[b], length)
        self.layout = list(target)
        self.relayouts += 1
        return {target[b] for _, b in moves}

    def _step(self, seq_ids, num_computed, num_new, row_of, seq_len, kind) -> RowsStep:
        heads, cap, dev = self.num_kv_heads, self.capacity, self.device
        token_row, token_pos, first_query = [], [], {}
        for s, c, n in zip(seq_ids, num_computed, num_new):
            first_query[s] = len(token_row)
            token_row += [row_of[s]] * n
            token_pos += range(c, c + n)
            self.dirty[row_of[s]] = max(self.dirty[row_of[s]], c + n)
        rows_t = torch.tensor(token_row, dtype=torch.long)
        pos_t = torch.tensor(token_pos, dtype=torch.long)
        write_index = ((rows_t[:, None] * heads + torch.arange(heads)[None, :]) * cap + pos_t[:, None]).reshape(-1)
        buckets = []
        for n, start, seqs in _segments(self.layout, kind):
            lengths = [seq_len[s] for s in seqs]
            for a, b in equal_count_runs(lengths):
                members = seqs[a:b]
                length = max(lengths[a:b])
                lens = torch.tensor(lengths[a:b], dtype=torch.long)
                q_pos = lens[:, None] - n + torch.arange(n)[None, :]
                token_rows = torch.tensor([first_query[s] + j for s in members for j in range(n)], dtype=torch.long)
                buckets.append(RowBucket(start + a, start + b, length, n, token_rows.to(dev), q_pos.to(dev)))
        long_seqs = [(row_of[s], first_query[s], first_query[s] + kind[s], seq_len[s])
                     for s in seq_ids if kind[s] > SHORT_QUERY_LEN]
        return RowsStep(write_index.to(dev), buckets, long_seqs)


def write_rows(k: torch.Tensor, v: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, step: RowsStep) -> None:
    """Store the new k, v [T, Hkv, D] in their sequences' rows."""
    head_dim = k.shape[-1]
    k_rows.view(-1, head_dim).index_copy_(0, step.write_index, k.reshape(-1, head_dim))
    v_rows.view(-1, head_dim).index_copy_(0, step.write_index, v.reshape(-1, head_dim))


def rows_attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, step: RowsStep, scale: float,
                   sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention_ref's result (packed q [T, H, D] -> [T, H, D]) read from the rows, whose
    contexts already include the new tokens.

    In float32 a bucket is two batched matmuls over views of its rows, with each KV head's
    G = H / Hkv query heads (times Q queries) as the rows of one matrix, so K/V are read once per
    KV head and never copied (on this CPU 1.5-2x faster than the fused attention call for decode
    shapes). In lower precision it is the fused call over the same views, which accumulates the
    scores in float32 as the reference does. A long (prefill) sequence takes one fused call over
    its row."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k_rows.shape[1]
    groups = num_heads // num_kv
    out = torch.empty_like(q)
    for i, b in enumerate(step.buckets):
        s, n = b.stop - b.start, b.num_queries
        keys, values = k_rows[b.start : b.stop, :, : b.length], v_rows[b.start : b.stop, :, : b.length]
        if q.dtype != torch.float32:
            o = F.scaled_dot_product_attention(
                q[b.token_rows].view(s, n, num_heads, head_dim).transpose(1, 2), keys, values,
                attn_mask=step.allowed(i, sliding_window), scale=scale, enable_gqa=groups > 1)
            out[b.token_rows] = o.transpose(1, 2).reshape(s * n, num_heads, head_dim)
            continue
        q_b = q[b.token_rows].view(s, n, num_kv, groups, head_dim)  # head h = kv head * groups + g
        q_b = q_b.view(s, num_kv, groups, head_dim) if n == 1 else \
            q_b.permute(0, 2, 3, 1, 4).reshape(s, num_kv, groups * n, head_dim)
        scores = torch.matmul(q_b, keys.transpose(-1, -2)).mul_(scale).add_(
            step.additive(i, sliding_window, groups))
        o = torch.matmul(torch.softmax(scores, dim=-1), values)  # [S, Hkv, G * Q, D]
        if n == 1:
            out[b.token_rows] = o.view(s, num_heads, head_dim)
        else:
            out[b.token_rows] = o.view(s, num_kv, groups, n, head_dim).permute(0, 3, 1, 2, 4).reshape(
                s * n, num_heads, head_dim)
    for row, qs, qe, length in step.long_seqs:
        k_pos = torch.arange(length, device=q.device)
        keys, values = k_rows[row, :, :length].transpose(0, 1), v_rows[row, :, :length].transpose(0, 1)
        out[qs:qe] = _attend(q[qs:qe], keys, values, k_pos[length - (qe - qs):], k_pos, scale, sliding_window)
    return out
