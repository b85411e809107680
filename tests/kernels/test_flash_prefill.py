"""tpserve.kernels.flash_prefill against write_kv_cache + paged_attention_ref (Triton interpreter)."""

import pytest
import torch

from tpserve.kernels.flash_prefill import flash_prefill
from tpserve.ops.attention import paged_attention_ref, write_kv_cache


def index_args(meta):
    """The kernel's index tensors and sizes, from the metadata the reference takes."""
    return meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len


def _run_and_check(batch, dtype, scale, window, assert_close, **blocks):
    ref_k, ref_v = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(batch.k, batch.v, ref_k, ref_v, batch.meta.slot_mapping)
    expected = paged_attention_ref(batch.q, ref_k, ref_v, batch.meta, scale, window)

    out = torch.full_like(batch.q, float("nan"))
    got = flash_prefill(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, *index_args(batch.meta), scale,
                        window, out=out, **blocks)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, expected, dtype)
    # The cache now holds the new K/V at their slots and nothing else changed (NaN included).
    torch.testing.assert_close(batch.k_cache, ref_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(batch.v_cache, ref_v, atol=0, rtol=0, equal_nan=True)


# (num_heads, num_kv): MHA, GQA 2 and 4, MQA.
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_from_empty_cache(heads, dtype, paged_batch, assert_close):
    num_heads, num_kv = heads
    # q_len 17 and 33 straddle BLOCK_M=16; 1 is a single-token prompt.
    batch = paged_batch([17, 1, 33], [17, 1, 33], num_heads, num_kv, 32, block_size=8, dtype=dtype)
    _run_and_check(batch, dtype, 32**-0.5, None, assert_close)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_prefill_over_cached_prefix(window, dtype, paged_batch, assert_close):
    # Sequence 0: 30 cached + 19 new; 1: 16 cached + 1 new (decode-like); 2: no prefix.
    batch = paged_batch([49, 17, 20], [19, 1, 20], 4, 2, 32, block_size=16, dtype=dtype, seed=1)
    _run_and_check(batch, dtype, 0.2, window, assert_close)


def test_sliding_window_mqa_non_power_of_two_head_dim(paged_batch, assert_close):
    dtype = torch.float32
    batch = paged_batch([40, 9], [25, 9], 4, 1, 40, block_size=4, dtype=dtype, seed=2)
    _run_and_check(batch, dtype, 40**-0.5, 5, assert_close, block_m=32, block_n=16)


def test_errors_name_the_bad_value(paged_batch):
    batch = paged_batch([5], [5], 4, 2, 16, block_size=4, dtype=torch.float32)
    args = (batch.k_cache, batch.v_cache, *index_args(batch.meta), 0.25)
    with pytest.raises(ValueError, match=r"k must be \[5, 2, 16\]"):
        flash_prefill(batch.q, batch.k[:, :1], batch.v, *args)
    with pytest.raises(ValueError, match="does not fit q heads=3"):
        flash_prefill(batch.q[:, :3], batch.k, batch.v, *args)
    with pytest.raises(ValueError, match="cache dtype"):
        flash_prefill(batch.q.half(), batch.k.half(), batch.v.half(), *args)
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        flash_prefill(batch.q, batch.k, batch.v, *args, sliding_window=0)
