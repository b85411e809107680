"""Adaptive k: safe start, cheap probing on a few sequences, and choosing by measured throughput
per batch-size bucket."""

from tpserve.engine.spec_decode.controller import PROBE_SEQS, PROBE_STEPS, SpecController


def drive(ctrl, batch, rate_of_k, steps):
    """rate_of_k: tokens/s of a step when the whole batch speculates with k. A partial step with n
    of the batch speculating costs and yields in proportion."""
    chosen = []
    for _ in range(steps):
        k, n = ctrl.choose_k(batch)
        chosen.append((k, n))
        base_time = batch / rate_of_k[0]
        if k == 0 or n == 0:
            tokens, secs = batch, base_time
        else:
            full_time = base_time * 2  # speculation doubles the step time in this model
            full_tokens = rate_of_k[k] * full_time
            tokens = batch + (full_tokens - batch) * n / batch
            secs = base_time + (full_time - base_time) * n / batch
        ctrl.record_step(batch, k, n, int(round(tokens * 1000)), secs * 1000)
    return chosen


def test_large_batch_probes_few_sequences_then_stays_off():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 64, {0: 100, 1: 60, 2: 50, 4: 30}, 40)
    assert chosen[:PROBE_STEPS] == [(0, 0)] * PROBE_STEPS
    assert chosen[PROBE_STEPS : 2 * PROBE_STEPS] == [(1, PROBE_SEQS)] * PROBE_STEPS
    assert chosen[2 * PROBE_STEPS :] == [(0, 0)] * (40 - 2 * PROBE_STEPS)


def test_speculates_where_it_wins_and_finds_the_best_k():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 1, {0: 100, 1: 130, 2: 170, 4: 150}, 30)
    assert chosen[-10:] == [(2, 1)] * 10
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 32, {0: 100, 1: 130, 2: 170, 4: 150}, 30)
    assert chosen[-10:] == [(2, 32)] * 10, chosen


def test_buckets_are_independent_and_pinned_mode_is_fixed():
    ctrl = SpecController(max_k=4)
    drive(ctrl, 64, {0: 100, 1: 60, 2: 50, 4: 30}, 20)
    assert drive(ctrl, 1, {0: 100, 1: 130, 2: 170, 4: 150}, 30)[-1] == (2, 1)
    assert ctrl.choose_k(64) == (0, 0)
    assert SpecController(max_k=3, adaptive=False).choose_k(64) == (3, 64)
