"""Block manager: prefix hits, reference counts, eviction order, invariants, no leaks."""

from __future__ import annotations

import random

import pytest

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.sequence import Sequence

BS = 4


def seq(seq_id, tokens, max_tokens=8):
    return Sequence(seq_id, f"r{seq_id}", list(tokens), SamplingParams(max_tokens=max_tokens))


def run_prefill(bm, s):
    """Admit and compute the whole prompt, committing full blocks as the engine does."""
    assert bm.admit(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s, s.num_computed_tokens)


def test_prefix_hit_reuses_blocks_and_counts_refs():
    bm = BlockManager(16, BS)
    a = seq(0, range(10))  # blocks: [0-3] [4-7] [8,9]
    run_prefill(bm, a)
    b = seq(1, list(range(8)) + [50, 51, 52])
    assert bm.admit(b, b.num_tokens)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.check_invariants([a, b])


def test_last_token_is_always_computed():
    """A prompt fully in the cache still recomputes its last block (the step must produce logits)."""
    bm = BlockManager(16, BS)
    a = seq(0, range(8))
    run_prefill(bm, a)
    b = seq(1, range(8))
    assert bm.admit(b, 8)
    assert b.num_cached_tokens == 4
    bm.check_invariants([a, b])


def test_prefix_caching_off():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a = seq(0, range(10))
    run_prefill(bm, a)
    b = seq(1, range(10))
    assert bm.admit(b, 10) and b.num_cached_tokens == 0
    assert bm.counts()["cached"] == 0


def test_exact_eviction_order():
    bm = BlockManager(6, BS)
    a = seq(0, range(12))  # 3 full blocks, all hashed after prefill
    run_prefill(bm, a)
    b = seq(1, range(100, 106))  # 1 full + 1 partial (unhashed) block
    run_prefill(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.counts() == {"free": 2, "cached": 4, "in_use": 0, "total": 6}
    never_used = 5
    # Unhashed blocks first (the latest freed at the very front), then cached blocks least recently
    # freed first, each sequence's tail before its head.
    expected = [b_blocks[1], never_used, a_blocks[2], a_blocks[1], a_blocks[0], b_blocks[0]]
    taker = seq(2, range(200, 200 + 6 * BS))
    assert bm.ensure_slots(taker, 6 * BS)
    assert taker.block_table == expected
    assert bm.counts() == {"free": 0, "cached": 0, "in_use": 6, "total": 6}
    bm.check_invariants([taker])


def test_hit_on_evictable_block_is_reclaimed_not_double_counted():
    bm = BlockManager(3, BS)
    a = seq(0, range(9))
    run_prefill(bm, a)
    bm.free(a)
    # 9-token prompt again: 2 cached blocks + 1 new; all 3 blocks are needed, and 2 come from hits.
    b = seq(1, range(9))
    assert bm.admit(b, 9)
    assert b.num_cached_tokens == 8 and len(b.block_table) == 3
    bm.check_invariants([b])
    c = seq(2, range(50, 59))
    assert not bm.admit(c, 9)  # nothing left, and nothing changed
    assert c.block_table == [] and c.num_computed_tokens == 0
    bm.check_invariants([b])


def test_truncate_releases_only_unhashed_tail():
    bm = BlockManager(8, BS)
    a = seq(0, range(6))
    run_prefill(bm, a)
    assert bm.ensure_slots(a, 6 + 7)  # lookahead slots for speculative tokens
    assert len(a.block_table) == 4
    bm.truncate(a, 7)
    assert len(a.block_table) == 2
    bm.check_invariants([a])


def test_random_operations_never_leak():
    rng = random.Random(0)
    bm = BlockManager(40, BS)
    live: list[Sequence] = []
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    next_id = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.4:
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
            s = seq(next_id, tokens)
            next_id += 1
            if bm.admit(s, rng.randrange(1, s.num_tokens + 1)):
                live.append(s)
        elif op < 0.75 and live:
            s = rng.choice(live)
            # compute what is allocated, then decode a token if the prompt is done
            s.num_computed_tokens = min(s.num_tokens, len(s.block_table) * BS)
            bm.commit(s, s.num_computed_tokens)
            if s.num_computed_tokens == s.num_tokens and bm.ensure_slots(s, s.num_tokens + 1):
                s.token_ids.append(rng.randrange(1000))
        elif live:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)  # finish or abort
        bm.check_invariants(live)
    for s in live:
        bm.free(s)
    bm.check_invariants([])
    c = bm.counts()
    assert c["in_use"] == 0 and c["free"] + c["cached"] == 40
    assert bm.num_hit_tokens > 0


def test_admit_twice_is_a_bug():
    bm = BlockManager(8, BS)
    a = seq(0, range(6))
    assert bm.admit(a, 6)
    with pytest.raises(AssertionError):
        bm.admit(a, 6)


def test_invariant_counts_each_state_on_its_own_so_the_sum_can_fail():
    bm = BlockManager(8, BS)
    a = seq(0, range(10))
    run_prefill(bm, a)
    bm.free(a)  # two cached blocks (full), one free again
    b = seq(1, range(20, 26))
    run_prefill(bm, b)
    bm.check_invariants([b])
    assert bm.counts() == {"free": 4, "cached": 2, "in_use": 2, "total": 8}
    # A block held without any table naming it (a leak) is in no state the check counts.
    leaked = next(iter(bm._evictable))
    bm._take(leaked)
    with pytest.raises(AssertionError, match="do not add up to 8 blocks"):
        bm.check_invariants([b])
    bm._release([leaked])
    bm.check_invariants([b])
    # A cached block whose registry entry is lost is counted nowhere either.
    h, block_id = next(iter(bm._cached.items()))
    assert bm.blocks[block_id].ref_count == 0
    del bm._cached[h]
    with pytest.raises(AssertionError, match="do not add up"):
        bm.check_invariants([b])
    bm._cached[h] = block_id
    # The kept counts must match what is counted.
    bm._num_cached_evictable += 1
    with pytest.raises(AssertionError, match="kept counts"):
        bm.check_invariants([b])
