"""Shared builders for the kernel tests (run under TRITON_INTERPRET=1, set by tests/conftest.py)."""

import pytest
import torch

from tpserve.ops.attention import AttentionMetadata

# (atol, rtol) per dtype for outputs of magnitude ~1: fp32 only differs by summation order;
# fp16 rounds inputs / probabilities / dequantised weights once to an 11-bit mantissa.
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 2e-3)}


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert torch.isfinite(actual).all(), "kernel output has non-finite values (unwritten or NaN leaked)"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


class PagedBatch:
    """A packed batch over a paged cache whose block ids are shuffled across sequences and whose
    every slot not holding context K/V (including the new tokens' slots) is NaN.

    ctx_k / ctx_v [L_i, Hkv, D] per sequence hold the full context; positions < L_i - q_len_i
    are already in the cache (the cached prefix), the last q_len_i are `k` / `v` [T, Hkv, D]."""

    def __init__(self, seq_lens, q_lens, num_heads, num_kv, head_dim, block_size, dtype, seed=0, spare_blocks=3):
        g = torch.Generator().manual_seed(seed)
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + spare_blocks
        ids = torch.randperm(num_blocks, generator=g)
        table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)  # +1: an unused column
        used = 0
        for i, nb in enumerate(blocks_per_seq):
            table[i, :nb] = ids[used:used + nb].to(torch.int32)
            used += nb
        shape = (num_blocks, block_size, num_kv, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        ks, vs, qs, slots = [], [], [], []
        for i, (n, ql) in enumerate(zip(seq_lens, q_lens)):
            pos = torch.arange(n)
            slot = table[i, pos // block_size].long() * block_size + pos % block_size
            ctx_k = torch.randn(n, num_kv, head_dim, generator=g).to(dtype)
            ctx_v = torch.randn(n, num_kv, head_dim, generator=g).to(dtype)
            pre = n - ql
            self.k_cache.view(-1, num_kv, head_dim)[slot[:pre]] = ctx_k[:pre]
            self.v_cache.view(-1, num_kv, head_dim)[slot[:pre]] = ctx_v[:pre]
            ks.append(ctx_k[pre:])
            vs.append(ctx_v[pre:])
            slots.append(slot[pre:])
            qs.append(torch.randn(ql, num_heads, head_dim, generator=g).to(dtype))
        self.q, self.k, self.v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        starts = [0]
        for ql in q_lens:
            starts.append(starts[-1] + ql)
        self.meta = AttentionMetadata(
            slot_mapping=torch.cat(slots),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=table,
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
        )


@pytest.fixture
def paged_batch():
    return PagedBatch


@pytest.fixture(name="assert_close")
def assert_close_fixture():
    return assert_close
