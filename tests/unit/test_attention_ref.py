"""paged_attention_ref against dense per-query attention, for every mix of batched (short-query)
and per-sequence (prefill) rows, with GQA, sliding windows, NaN in unwritten cache slots, and
decode contexts of very different lengths (split into length buckets)."""

import pytest
import torch

from tpserve.ops.attention import SHORT_QUERY_LEN, AttentionMetadata, paged_attention_ref, write_kv_cache


def _dense(q, k, v, q_pos, scale, window):
    """One query row q [H, D] at position q_pos over k/v [L, Hkv, D], written out by hand."""
    group = q.shape[0] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[0]):
        kh, vh = k[: q_pos + 1, h // group], v[: q_pos + 1, h // group]
        scores = (kh @ q[h]) * scale
        if window is not None:
            scores[: max(0, q_pos + 1 - window)] = float("-inf")
        out[h] = scores.softmax(-1) @ vh
    return out


def _batch(seq_lens, q_lens, heads=4, kv_heads=2, head_dim=8, block_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks) + 1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    used, slots, ctx = 0, [], []
    for i, (n, nq) in enumerate(zip(seq_lens, q_lens)):
        table[i, : blocks[i]] = perm[used : used + blocks[i]].int()
        used += blocks[i]
        pos = torch.arange(n)
        slot = table[i, pos // block_size].long() * block_size + pos % block_size
        k, v = torch.randn(n, kv_heads, head_dim, generator=g), torch.randn(n, kv_heads, head_dim, generator=g)
        write_kv_cache(k, v, k_cache, v_cache, slot)  # the new tokens' K/V are written before attention
        slots.append(slot[n - nq :])
        ctx.append((k, v))
    starts = [0]
    for nq in q_lens:
        starts.append(starts[-1] + nq)
    meta = AttentionMetadata(torch.cat(slots), torch.tensor(starts, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), table, starts, list(seq_lens),
                             max(q_lens), max(seq_lens))
    q = torch.randn(starts[-1], heads, head_dim, generator=g)
    return q, k_cache, v_cache, meta, ctx


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("seq_lens,q_lens", [
    ([9, 17, 3], [1, 1, 1]),                       # decode only
    ([9, 17, 6], [3, 3, 3]),                       # verification rows, all the same length
    ([9, 30, 6, 12], [1, 5, 2, 4]),                # ragged short rows
    ([40, 9, 25, 7], [SHORT_QUERY_LEN + 9, 1, 4, 7]),  # a prefill chunk among decodes and verifications
    ([40, 21], [40, SHORT_QUERY_LEN + 1]),          # prefill only
    ([3, 700, 9, 650, 40, 5, 720, 33, 300, 8], [1] * 10),  # decodes split into length buckets
    ([3, 700, 9, 650, 40, 5, 720, 33], [2, 2, 1, 1, 2, 1, 2, 1]),  # two query lengths, each bucketed
])
def test_matches_dense_attention(seq_lens, q_lens, window):
    from tpserve.ops.attention import _short_groups

    buckets = _short_groups(_batch(seq_lens, q_lens)[3], 4, window, torch.device("cpu"))
    if len(seq_lens) >= 8:
        assert len(buckets) > len(set(q_lens)), "long and short contexts should not share a padded gather"
    q, k_cache, v_cache, meta, ctx = _batch(seq_lens, q_lens)
    scale = 0.3
    got = paged_attention_ref(q, k_cache, v_cache, meta, scale, window)
    again = paged_attention_ref(q, k_cache, v_cache, meta, scale, window)  # memoised index tensors
    assert torch.equal(got, again)
    row = 0
    for (k, v), n, nq in zip(ctx, seq_lens, q_lens):
        for j in range(nq):
            expected = _dense(q[row], k, v, n - nq + j, scale, window)
            torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)
            row += 1
    assert not got.isnan().any()
