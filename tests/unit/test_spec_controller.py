"""Adaptive k: safe start, cheap probing with early stop and backoff, choosing k from measured
step costs and the estimated acceptance rate per batch-size bucket, and switching off again when
speculation stops paying."""

import random

import pytest

from tpserve.engine.spec_decode.controller import (
    COST_SAMPLES, FIRST_REPROBE, MAX_REPROBE, PROBE_BUDGET, PROBE_SEQ_STEPS, PROBE_SEQS, PROBE_STEPS, REMEASURE_EVERY, WARMUP_STEPS,
    SpecController, fit_pass_cost,
)
from tpserve.engine.spec_decode.state import AcceptanceCounts


def new_seqs(n):
    """The own acceptance counts of n new sequences (what each sequence carries in seq.spec)."""
    return [AcceptanceCounts() for _ in range(n)]


def accepted_of(rng, alpha, k):
    """Proposals accepted out of k, each with probability alpha once the ones before it were."""
    accepted = 0
    while accepted < k and rng.random() < alpha:
        accepted += 1
    return accepted


def drive(ctrl, batch, alpha, cost, steps, catch_up_seconds=0.0, seed=0, shadow=False):
    """A simulated machine running `batch` new sequences. cost[k]: seconds of
    a step in which the whole batch speculates with k; a step with n of the batch speculating costs
    cost[0] + (cost[k] - cost[0]) * n / batch. Each proposal is accepted with probability alpha (a
    number, or a function of the step index). The first step in which a sequence speculates costs
    `catch_up_seconds` more. With `shadow`, each sequence not speculating records one shadow
    verification at the controller's largest k per step, as free proposals do."""
    rng = random.Random(seed)
    chosen, caught_up = [], set()
    seqs = new_seqs(batch)
    for step in range(steps):
        a = alpha(step) if callable(alpha) else alpha
        k, n = ctrl.choose_k(seqs)
        chosen.append((k, n))
        n = n if k else 0
        tokens, secs = batch, cost[0]
        if n:
            secs += (cost[k] - cost[0]) * n / batch + catch_up_seconds * len(set(range(n)) - caught_up)
            caught_up |= set(range(n))
        for own in seqs[:n]:
            accepted = accepted_of(rng, a, k)
            ctrl.record_verification(own, accepted, k)
            tokens += accepted
        for own in seqs[n:] if shadow else []:
            ctrl.record_verification(own, accepted_of(rng, a, ctrl.max_k), ctrl.max_k)
        ctrl.record_step(batch, k, n, tokens, secs)
    return chosen


# Costs where speculation loses even if every proposal is accepted (k = 1 triples the step).
EXPENSIVE = {0: 1.0, 1: 3.0, 2: 4.0, 4: 6.0}
# Costs where k = 2 is clearly best at alpha = 0.8 (rates 1, 1.8/1.4, 2.44/1.5, 3.36/2.6) and at 0.7.
CHEAP = {0: 1.0, 1: 1.4, 2: 1.5, 4: 2.6}


def test_expected_tokens_follow_per_position_acceptance():
    ctrl = SpecController(max_k=4)
    assert ctrl.estimates.batch_expected_tokens([], 4) == 1  # nothing seen yet: nothing expected
    own, newcomer = new_seqs(2)
    for _ in range(400):  # bursty: half the verifications accept all 4, half reject the first
        ctrl.record_verification(own, 4, 4)
        ctrl.record_verification(own, 0, 4)
    # Independent coin flips at the overall rate (4 accepted per 5 trials) would give
    # 1 + .8 + .64 + .51 + .41 = 3.36; position by position it is 1 + .5 * 4 = 3.
    assert ctrl.estimates.acceptance == pytest.approx(0.8, abs=0.01)
    assert ctrl.estimates.sequence_expected_tokens(own, 4) == pytest.approx(3.0, abs=0.1)
    assert ctrl.estimates.sequence_expected_tokens(own, 1) == pytest.approx(1.5, abs=0.05)
    assert ctrl.estimates.sequence_expected_tokens(newcomer, 4) == pytest.approx(3.0, abs=0.1)  # the pooled profile


def test_a_probe_lost_on_cost_stops_at_once_and_waits_the_longest_interval():
    ctrl = SpecController(max_k=4)
    steps = WARMUP_STEPS + 2 + MAX_REPROBE + 4
    chosen = drive(ctrl, 64, 0.4, EXPENSIVE, steps)
    # One unmeasured catch-up step, then one measured step shows it losing even at full acceptance.
    first_end = WARMUP_STEPS + 2
    assert chosen[:first_end] == [(0, 0)] * WARMUP_STEPS + [(1, PROBE_SEQS)] * 2
    probes = [i for i, c in enumerate(chosen) if c != (0, 0)]
    # No text can make k = 1 pay when its cost alone loses: the next probe comes MAX_REPROBE later.
    second = first_end - 1 + MAX_REPROBE
    assert probes == list(range(WARMUP_STEPS, first_end)) + list(range(second, second + 2))


def test_a_probe_lost_on_acceptance_backs_off_doubling():
    # k = 1 costs 1.5: full acceptance would win, alpha = 0.1 does not. The text may change, so the
    # next probes come FIRST_REPROBE, then twice that, after each lost one.
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 64, 0.1, {0: 1.0, 1: 1.5, 2: 2.0, 4: 3.0}, WARMUP_STEPS + 3 * FIRST_REPROBE + 40)
    starts = [i for i, c in enumerate(chosen) if c[0] and (i == 0 or not chosen[i - 1][0])]
    ends = [i for i, c in enumerate(chosen) if c[0] and (i + 1 == len(chosen) or not chosen[i + 1][0])]
    assert starts[0] == WARMUP_STEPS and len(starts) == 3, chosen
    assert [b - a for a, b in zip(ends, starts[1:])] == [FIRST_REPROBE, 2 * FIRST_REPROBE]


def test_a_close_probe_runs_all_its_steps():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 64, 0.7, {0: 1.0, 1: 1.5, 2: 2.5, 4: 4.0}, 30)  # k = 1 yields ~1.7 for 1.5
    measured = max(PROBE_STEPS, -(-PROBE_SEQ_STEPS // PROBE_SEQS))
    probe = chosen[WARMUP_STEPS : WARMUP_STEPS + 2 + measured]
    assert probe == [(1, PROBE_SEQS)] * (1 + measured) + [(1, 64)], chosen  # a narrow win: on


def test_speculates_where_it_wins_and_finds_the_best_k():
    for batch in (1, 32):
        ctrl = SpecController(max_k=4)
        chosen = drive(ctrl, batch, 0.8, CHEAP, 60)
        tail = [c for i, c in enumerate(chosen[-20:], start=40) if (i + 1) % REMEASURE_EVERY]
        assert tail == [(2, batch)] * len(tail), chosen
        assert abs(ctrl.estimates.acceptance - 0.8) < 0.15


def test_catch_up_cost_of_the_first_probe_step_is_not_held_against_speculation():
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 32, 0.8, CHEAP, 40, catch_up_seconds=1.0)  # a catch-up worth 4 whole steps
    assert chosen[-1] == (2, 32), chosen


def test_free_proposals_are_probed_at_the_largest_k_on_the_whole_batch():
    ctrl = SpecController(max_k=4, free_proposals=True)
    chosen = drive(ctrl, 16, 0.6, {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.1}, 40)
    # No catch-up step: the probe is exactly PROBE_STEPS measured steps.
    assert chosen[WARMUP_STEPS : WARMUP_STEPS + PROBE_STEPS] == [(4, 16)] * PROBE_STEPS
    assert chosen[-1] == (4, 16), chosen  # 2.31 tokens for 1.1 beats 1.96 for 1.1 and 1.6 for 1.05


def test_switches_off_when_acceptance_drops_and_back_on_when_it_recovers():
    ctrl = SpecController(max_k=4)
    alpha = lambda step: 0.05 if 40 <= step < 140 else 0.8  # noqa: E731
    chosen = drive(ctrl, 8, alpha, CHEAP, 140 + 2 * FIRST_REPROBE + PROBE_SEQ_STEPS // PROBE_SEQS + 8)
    assert (2, 8) in chosen[:40]
    # Within 40 steps of the drop (the acceptance estimate's memory) it is off: ten steps in a row
    # without speculation ...
    assert any(chosen[i : i + 10] == [(0, 0)] * 10 for i in range(40, 80)), chosen[40:90]
    # ... and speculates only in short probes until acceptance recovers, then again for good.
    assert sum(k > 0 and n == 8 for k, n in chosen[90:140]) == 0, chosen[90:140]
    assert chosen[-1] == (2, 8), chosen[140:]


def test_a_batch_size_that_does_not_last_is_not_probed():
    ctrl = SpecController(max_k=4)
    for _ in range(10):  # a load alternating between two batch sizes, never long at either
        assert drive(ctrl, 8, 0.8, CHEAP, WARMUP_STEPS) + drive(ctrl, 32, 0.8, CHEAP, WARMUP_STEPS) == \
            [(0, 0)] * (2 * WARMUP_STEPS)


def test_buckets_are_independent_and_pinned_mode_is_fixed():
    ctrl = SpecController(max_k=4)
    drive(ctrl, 64, 0.8, EXPENSIVE, 20)
    assert drive(ctrl, 1, 0.8, CHEAP, 40)[-1] == (2, 1)
    assert ctrl.choose_k(new_seqs(64)) == (0, 0)
    assert SpecController(max_k=3, adaptive=False).choose_k(new_seqs(64)) == (3, 64)


def test_each_sequence_has_its_own_acceptance_shrunk_towards_the_pooled_rate():
    ctrl = SpecController(max_k=4)
    s1, s2, s3 = new_seqs(3)
    for _ in range(30):
        ctrl.choose_k([s1, s2])
        ctrl.record_verification(s1, 4, 4)  # always fully accepted
        ctrl.record_verification(s2, 0, 4)  # always rejected at once
    pooled = ctrl.estimates.acceptance
    assert 0.7 < pooled < 0.9  # 4 accepted per 5 trials
    assert ctrl.estimates.sequence_acceptance(s1) > 0.95 and ctrl.estimates.sequence_acceptance(s2) < 0.15
    # A sequence without verifications of its own starts from the pooled rate, not from another's.
    assert ctrl.estimates.sequence_acceptance(s3) == pytest.approx(pooled)
    ctrl.choose_k([s2, s3])
    e = ctrl.estimates.batch_expected_tokens([s2, s3], 4)
    assert e == pytest.approx((ctrl.estimates.sequence_expected_tokens(s2, 4) + ctrl.estimates.sequence_expected_tokens(s3, 4)) / 2)
    assert ctrl.estimates.sequence_expected_tokens(s2, 4) < 1.3 < 4.5 < ctrl.estimates.sequence_expected_tokens(s1, 4)
    # A sequence's own counts live on it and go with it: the estimates keep only the pooled ones.
    assert set(vars(ctrl.estimates)) == {"positions", "_pool"}


def test_a_new_request_does_not_inherit_its_predecessors_acceptance():
    # Batch 1: a request the draft predicts perfectly, then one it never predicts (a server that
    # was in a repetition loop and gets a fresh text).
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 1, 1.0, CHEAP, 60)
    assert chosen[-1][0] > 0
    chosen = drive(ctrl, 1, 0.0, CHEAP, 40)  # a new sequence
    speculating = [i for i, (k, n) in enumerate(chosen) if k and n]
    # Its own rejections outweigh the prior of pooled acceptance ~1 within a few steps (the pooled
    # rate alone, whose memory spans tens of steps, would keep it speculating for much longer).
    assert speculating and speculating[-1] < 8, chosen


def test_shadow_acceptance_brings_a_free_proposer_back_before_its_backoff_ends():
    # n-gram lookup at batch 4: nothing repeats at first (the probe loses), then the text repeats.
    alpha = lambda step: 0.0 if step < 30 else 0.9  # noqa: E731
    costs = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.15}
    runs = {}
    for shadow in (False, True):
        ctrl = SpecController(max_k=4, free_proposals=True)
        runs[shadow] = drive(ctrl, 4, alpha, costs, 70, shadow=shadow)
        assert runs[shadow][WARMUP_STEPS] == (4, 4) and (0, 0) in runs[shadow][WARMUP_STEPS + 1 : 30]
    first_back = [min(i for i in range(30, 70) if runs[s][i] == (4, 4)) if any(
        runs[s][i] == (4, 4) for i in range(30, 70)) else None for s in (False, True)]
    assert first_back[0] is None or first_back[0] >= WARMUP_STEPS + FIRST_REPROBE - 1  # waits out its backoff
    assert first_back[1] is not None and first_back[1] < 45, runs[True][30:]  # shadow: back within steps
    assert runs[True][-1] == (4, 4)


def drive_draft(ctrl, batch, alpha, steps, plain=1.0, fixed=0.3, per_token=0.002, per_row=0.005, context=100,
                cliff=0.0, seed=0):
    """A simulated machine with a draft model: each draft pass costs `fixed` + `per_token` * its
    tokens (the first pass of a sequence's first speculating step catches up on `context` tokens,
    later first passes on the tokens it emitted last step, passes after the first one token each);
    the target pays `per_row` per verified proposal; a step with more than half the batch
    speculating costs `cliff` more (a cost the probe cannot see). Reports the draft passes."""
    rng = random.Random(seed)
    chosen, pending = [], {i: context for i in range(batch)}  # tokens each sequence's draft has to catch up on
    seqs = new_seqs(batch)
    for _ in range(steps):
        k, n = ctrl.choose_k(seqs)
        chosen.append((k, n))
        n = n if k else 0
        tokens, passes = batch, []
        for j in range(k if n else 0):
            t = sum(pending[i] for i in range(n)) if j == 0 else n
            passes.append((t, fixed + per_token * t))
        for i in range(batch):
            accepted = accepted_of(rng, alpha, k) if i < n else 0
            if i < n:
                ctrl.record_verification(seqs[i], accepted, k)
            tokens += accepted
            pending[i] = accepted + 1 if i < n else pending[i] + 1
        secs = plain + sum(t for _, t in passes) + per_row * n * k + (cliff if 2 * n > batch else 0.0)
        ctrl.record_step(batch, k, n, tokens, secs, passes)
    return chosen


def test_fit_pass_cost():
    assert fit_pass_cost([(1, 0.3)] * 5) is None
    a, b = fit_pass_cost([(100, 0.5), (1, 0.302), (2, 0.304), (1, 0.302)])
    assert abs(a - 0.3) < 1e-9 and abs(b - 0.002) < 1e-9


def test_a_draft_whose_passes_cost_little_per_token_is_extrapolated_from_one_sequence():
    # Each pass costs mostly a fixed part: one probed sequence pays it alone, the whole batch shares
    # it. Charging it per sequence would predict 16 * 1.8 tokens in 5.9 s (off wins); split by the fit
    # of the catch-up pass against one-token passes it predicts 1.44 s (speculation wins by 25%).
    ctrl = SpecController(max_k=4)
    chosen = drive_draft(ctrl, 16, 0.8, 80)
    assert chosen[WARMUP_STEPS] == (1, PROBE_SEQS)
    assert chosen[-1][0] > 0 and chosen[-1][1] == 16, chosen


def test_a_draft_whose_whole_batch_step_loses_stops_at_the_first_measured_step():
    ctrl = SpecController(max_k=4)
    chosen = drive_draft(ctrl, 64, 0.8, 30, per_token=0.05)  # a whole-batch pass costs ~5.8 plain steps
    assert chosen[WARMUP_STEPS : WARMUP_STEPS + 3] == [(1, PROBE_SEQS)] * 2 + [(0, 0)], chosen
    assert set(chosen[WARMUP_STEPS + 2 :]) == {(0, 0)}


def test_on_and_k1_losing_even_at_full_acceptance_switches_off_without_trying_larger_k():
    ctrl = SpecController(max_k=4)
    chosen = drive_draft(ctrl, 16, 0.8, 80, cliff=3.0)  # the probe predicts a win; whole-batch steps pay 3 more
    whole = [c for c in chosen if c[1] == 16]
    # The switch-on step (catch-up, unmeasured) and COST_SAMPLES measured k = 1 steps, then off.
    assert whole == [(1, 16)] * (1 + COST_SAMPLES), chosen


def test_a_probe_that_sees_only_rejections_stops_within_a_few_steps():
    # Batch 1, k = 1 costs 1.5 plain steps: it would beat k = 0 by the margin (1.5 / 0.95 = 1.58
    # tokens a step) at alpha >= 0.58, and its cost alone never shows it losing. Acceptance is 0:
    # with OPTIMISM = 4 imagined accepted steps the hopeful alpha after j rejections is 4 / (4 + j),
    # below 0.58 from j = 3 on, so the probe is the catch-up step and 3 measured steps instead of
    # its PROBE_SEQ_STEPS = 16.
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 1, 0.0, {0: 1.0, 1: 1.5, 2: 1.8, 4: 2.4}, 40)
    assert [c for c in chosen if c[0]] == [(1, 1)] * (1 + 3), chosen


def probe_length(chosen):
    """Steps of the first probe (from its catch-up step) and the choice right after it."""
    start = next(i for i, (k, _) in enumerate(chosen) if k)
    end = next(i for i in range(start, len(chosen)) if chosen[i][1] != PROBE_SEQS)
    return end - start, chosen[end]


def test_a_probe_decides_once_it_has_cost_its_budget():
    # Batch 2, one probed sequence, every proposal accepted: k = 1 would win, but narrowly (4 tokens
    # in 1.85 plain steps against 2 / 0.95 in 1), so neither early end applies, and each probe
    # step costs 0.425 plain steps. It decides (on) once catch-up and measured steps have cost
    # PROBE_BUDGET, instead of after PROBE_SEQ_STEPS = 16.
    ctrl = SpecController(max_k=4)
    chosen = drive(ctrl, 2, 1.0, {0: 1.0, 1: 1.85, 2: 2.6, 4: 4.0}, 60)
    steps = -(-PROBE_BUDGET // 0.425)  # catch-up + measured steps until the budget is spent
    assert probe_length(chosen) == (steps, (1, 2)), chosen
    assert steps < 1 + PROBE_SEQ_STEPS


def test_a_clearly_winning_probe_ends_after_probe_steps():
    # Batch 1, everything accepted, k = 1 costs 1.4: after PROBE_STEPS measured steps even 4 more
    # that accepted nothing leave it winning (1.5 tokens for 1.4 against 1 / 0.95 for 1).
    for steps, on in ((WARMUP_STEPS + PROBE_STEPS, False), (WARMUP_STEPS + 1 + PROBE_STEPS, True)):
        ctrl = SpecController(max_k=4)
        drive(ctrl, 1, 1.0, CHEAP, steps)
        bucket = ctrl.buckets[ctrl.bucket_of(1)]
        assert (bucket.probe is None, bucket.on) == (on, on), steps
