"""kernels.paged_decode_attention against paged_attention_ref's decode path (Triton interpreter)."""

import pytest
import torch

from tpserve.kernels.paged_decode import paged_decode_attention
from tpserve.ops.attention import paged_attention_ref, write_kv_cache


def _decode_batch(paged_batch, seq_lens, heads, head_dim, block_size, dtype, seed=0):
    """One new token per sequence, already written to the cache (the caller's job for decode)."""
    batch = paged_batch(seq_lens, [1] * len(seq_lens), heads[0], heads[1], head_dim, block_size, dtype, seed=seed)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    return batch


def _check(batch, dtype, scale, window, assert_close, **kwargs):
    meta = batch.meta
    expected = paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, meta, scale, window)
    out = torch.full_like(batch.q, float("nan"))
    got = paged_decode_attention(batch.q, batch.k_cache, batch.v_cache, meta.block_tables, meta.seq_lens, scale,
                                 window, out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_partitions(heads, dtype, paged_batch, assert_close):
    # partition 32: the 100-token context spans 4 partitions (the last ragged), 33 spans 2 and
    # the 1-token context leaves all but one partition idle; the grid is sized from block_tables.
    batch = _decode_batch(paged_batch, [33, 1, 100], heads, 32, 16, dtype)
    _check(batch, dtype, 32**-0.5, None, assert_close, partition_size=32)


@pytest.mark.parametrize("window", [1, 20, 64])
def test_sliding_window(window, paged_batch, assert_close):
    # Windows smaller than, straddling and larger than a partition: leading partitions skipped.
    dtype = torch.float32
    batch = _decode_batch(paged_batch, [90, 7, 45], (4, 2), 32, 8, dtype, seed=window)
    _check(batch, dtype, 0.3, window, assert_close, partition_size=32, max_seq_len=90)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_pass_when_one_partition_covers_all(dtype, paged_batch, assert_close):
    batch = _decode_batch(paged_batch, [20, 64, 3], (8, 1), 64, 16, dtype, seed=3)
    _check(batch, dtype, 0.125, None, assert_close, partition_size=512)


def test_many_partitions_reduce_in_chunks(paged_batch, assert_close):
    # 16-token partitions over 600 tokens: 38 partials, more than one 32-wide reduce chunk.
    dtype = torch.float32
    batch = _decode_batch(paged_batch, [600, 17], (2, 1), 16, 32, dtype, seed=4)
    # Larger keys in the second reduce chunk: its max beats the first chunk's, so the running
    # sums must be rescaled (random keys would usually leave the first max standing).
    pos = torch.arange(520, 600)
    slots = batch.meta.block_tables[0, pos // 32].long() * 32 + pos % 32
    batch.k_cache.view(-1, 1, 16)[slots] *= 3
    _check(batch, dtype, 0.25, None, assert_close, partition_size=16, max_seq_len=600)


def test_errors_name_the_bad_value(paged_batch):
    batch = _decode_batch(paged_batch, [5, 9], (4, 2), 16, 4, torch.float32)
    meta = batch.meta
    args = (batch.k_cache, batch.v_cache, meta.block_tables, meta.seq_lens, 0.25)
    with pytest.raises(ValueError, match=r"block_tables must be \[1, max_blocks\]"):
        paged_decode_attention(batch.q[:1], *args)
    with pytest.raises(ValueError, match="partition_size=40 must be a positive multiple of block_n=16"):
        paged_decode_attention(batch.q, *args, partition_size=40)
    with pytest.raises(ValueError, match=r"seq_lens must be contiguous \[2\]"):
        paged_decode_attention(batch.q, *args[:3], meta.seq_lens[:1], 0.25)
