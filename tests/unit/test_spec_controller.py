"""Adaptive k: safe start, cheap probing on a few sequences with backoff, choosing by measured
throughput per batch-size bucket, and switching off again when speculation stops paying."""

from tpserve.engine.spec_decode.controller import (
    FIRST_REPROBE, PROBE_SEQS, PROBE_STEPS, REMEASURE_EVERY, WARMUP_STEPS, SpecController,
)


def drive(ctrl, batch, rate_of_k, steps, catch_up_seconds=0.0):
    """rate_of_k: tokens/s of a step when the whole batch speculates with k (a dict, or a function
    of the step index returning one). A partial step with n of the batch speculating costs and
    yields in proportion. The first step in which a sequence speculates costs it
    `catch_up_seconds` more (the draft's catch-up)."""
    chosen, caught_up = [], set()
    for step in range(steps):
        rates = rate_of_k(step) if callable(rate_of_k) else rate_of_k
        k, n = ctrl.choose_k(batch)
        chosen.append((k, n))
        base_time = batch / rates[0]
        if k == 0 or n == 0:
            tokens, secs = batch, base_time
        else:
            full_time = base_time * 2  # speculation doubles the step time in this model
            full_tokens = rates[k] * full_time
            tokens = batch + (full_tokens - batch) * n / batch
            secs = base_time + (full_time - base_time) * n / batch
            secs += catch_up_seconds * len(set(range(n)) - caught_up)
            caught_up |= set(range(n))
        ctrl.record_step(batch, k, n, tokens, secs)
    return chosen


LOSES = {0: 100, 1: 60, 2: 50, 4: 30}
WINS = {0: 100, 1: 130, 2: 170, 4: 150}


def test_large_batch_probes_few_sequences_stops_early_when_clearly_losing_then_backs_off():
    ctrl = SpecController(max_k=4)
    steps = WARMUP_STEPS + 3 + 2 * FIRST_REPROBE + 4
    chosen = drive(ctrl, 64, LOSES, steps)
    # One unmeasured catch-up step, then two measured steps show it is clearly losing.
    first_end = WARMUP_STEPS + 3
    assert chosen[:first_end] == [(0, 0)] * WARMUP_STEPS + [(1, PROBE_SEQS)] * 3
    probes = [i for i, c in enumerate(chosen) if c != (0, 0)]
    # The second probe comes FIRST_REPROBE steps after the first one ended, and also loses; the
    # third would come twice as late, past the end of this run.
    second = first_end - 1 + FIRST_REPROBE
    assert probes == list(range(WARMUP_STEPS, first_end)) + list(range(second, second + 3))


def test_a_close_probe_runs_all_its_steps():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 64, {0: 100, 1: 95, 2: 90, 4: 80}, 12)
    assert chosen[WARMUP_STEPS : WARMUP_STEPS + 1 + PROBE_STEPS + 1] == [(1, PROBE_SEQS)] * (1 + PROBE_STEPS) + [(0, 0)]


def test_speculates_where_it_wins_and_finds_the_best_k():
    for batch in (1, 32):
        ctrl = SpecController(max_k=4)
        chosen = drive(ctrl, batch, WINS, 40)
        tail = [c for i, c in enumerate(chosen[-12:], start=28) if (i + 1) % REMEASURE_EVERY]
        assert tail == [(2, batch)] * len(tail), chosen


def test_catch_up_cost_of_the_first_probe_step_is_not_held_against_speculation():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 32, WINS, 30, catch_up_seconds=1.0)  # a catch-up ten times a whole step
    assert chosen[-1] == (2, 32), chosen


def test_free_proposals_are_probed_at_the_largest_k_on_the_whole_batch():
    ctrl = SpecController(max_k=4, free_proposals=True)
    chosen = drive(ctrl, 16, {0: 100, 1: 95, 2: 102, 4: 130}, 30)
    # No catch-up step: the probe is exactly PROBE_STEPS measured steps.
    assert chosen[WARMUP_STEPS : WARMUP_STEPS + PROBE_STEPS] == [(4, 16)] * PROBE_STEPS
    assert chosen[-1] == (4, 16), chosen


def test_switches_off_when_speculation_stops_paying_and_back_on_when_it_pays_again():
    ctrl = SpecController(max_k=4)
    phases = lambda step: LOSES if 30 <= step < 60 else WINS  # noqa: E731
    chosen = drive(ctrl, 8, phases, 60 + 2 * FIRST_REPROBE)
    assert (2, 8) in chosen[:30]
    assert chosen[45:60] == [(0, 0)] * 15, chosen
    assert chosen[-1] == (2, 8), chosen


def test_buckets_are_independent_and_pinned_mode_is_fixed():
    ctrl = SpecController(max_k=4)
    drive(ctrl, 64, LOSES, 20)
    assert drive(ctrl, 1, WINS, 30)[-1] == (2, 1)
    assert ctrl.choose_k(64) == (0, 0)
    assert SpecController(max_k=3, adaptive=False).choose_k(64) == (3, 64)
