"""Adaptive k: safe start, probing, and choosing by measured throughput per batch-size bucket."""

from tpserve.engine.spec_decode.controller import PROBE_STEPS, SpecController


def drive(ctrl, batch, rate_of_k, steps):
    chosen = []
    for _ in range(steps):
        k = ctrl.choose_k(batch)
        chosen.append(k)
        ctrl.record_step(batch, k, tokens=int(rate_of_k[k] * 10), seconds=10.0)
    return chosen


def test_starts_safe_and_turns_off_when_speculation_loses():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 64, {0: 100, 1: 60, 2: 50, 4: 30}, 40)
    assert chosen[:PROBE_STEPS] == [0] * PROBE_STEPS
    assert chosen[PROBE_STEPS : 2 * PROBE_STEPS] == [1] * PROBE_STEPS
    assert chosen[2 * PROBE_STEPS :] == [0] * (40 - 2 * PROBE_STEPS)  # no further exploration


def test_speculates_where_it_wins_and_finds_the_best_k():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 1, {0: 100, 1: 130, 2: 170, 4: 150}, 30)
    assert chosen[-10:] == [2] * 10


def test_buckets_are_independent_and_pinned_mode_is_fixed():
    ctrl = SpecController(max_k=4)
    drive(ctrl, 64, {0: 100, 1: 60, 2: 50, 4: 30}, 20)
    assert drive(ctrl, 1, {0: 100, 1: 130, 2: 170, 4: 150}, 30)[-1] == 2
    assert ctrl.choose_k(64) == 0
    assert SpecController(max_k=3, adaptive=False).choose_k(64) == 3
