"""Admission control's predictor on synthetic step timings (no engine, no clock)."""

from __future__ import annotations

import random

import pytest

from tpserve.errors import Overloaded
from tpserve.server.admission import AdmissionController, StepCostModel

A, B, C = 0.010, 0.0002, 0.001  # 10 ms per step + 0.2 ms per token + 1 ms per sequence


def step_seconds(tokens, seqs, a=A, b=B, c=C):
    return a + b * tokens + c * seqs


def fitted(a=A, b=B, c=C, noise=0.0, seed=0) -> StepCostModel:
    """Decode steps of 1-64 sequences and prefill chunks of up to 2048 tokens, as an engine runs."""
    rng = random.Random(seed)
    model = StepCostModel()
    for _ in range(400):
        if rng.random() < 0.5:
            seqs = tokens = rng.choice([1, 4, 16, 64])
        else:
            seqs, tokens = rng.choice([(1, 512), (2, 2048), (4, 1024)])
        model.observe(tokens, step_seconds(tokens, seqs, a, b, c) * (1 + rng.uniform(-noise, noise)), seqs)
    return model


def test_step_cost_fit_recovers_the_plane():
    assert fitted().coefficients() == pytest.approx((A, B, C), rel=1e-6)
    a, b, c = fitted(noise=0.05).coefficients()
    assert a == pytest.approx(A, rel=0.1) and b == pytest.approx(B, rel=0.1) and c == pytest.approx(C, rel=0.1)


def test_step_cost_stays_non_negative_and_follows_a_slower_machine():
    model = fitted(c=0.0)  # no per-sequence cost: the fit must not go negative anywhere
    assert all(v >= 0 for v in model.coefficients())
    for _ in range(3000):  # twice as slow from now on: old steps fade out
        for seqs, tokens in ((1, 1), (8, 8), (1, 512)):
            model.observe(tokens, 2 * step_seconds(tokens, seqs, c=0.0), seqs)
    assert model.seconds(8, 8) == pytest.approx(2 * step_seconds(8, 8, c=0.0), rel=0.02)
    assert model.seconds(512, 1) == pytest.approx(2 * step_seconds(512, 1, c=0.0), rel=0.02)


def test_not_ready_without_spread_admits_everything():
    model = StepCostModel()
    for _ in range(50):
        model.observe(8, 0.05, 8)  # only one step size: no slope
    assert not model.ready
    ctl = AdmissionController(0.001, max_num_seqs=1, max_num_batched_tokens=64, cost=model)
    for i in range(20):
        ctl.admit(f"r{i}", 100, 100)
    assert ctl.num_in_flight == 20


def test_prediction_is_slot_wait_plus_prefill():
    ctl = AdmissionController(100.0, max_num_seqs=2, max_num_batched_tokens=64, cost=fitted())
    assert ctl.predict(10) == pytest.approx(step_seconds(10, 1))  # idle: one prefill step of 10 tokens
    ctl.admit("d1", 5, 30)
    ctl.admit("d2", 5, 40)
    ctl.on_output("d1", 20, False)  # 10 tokens left
    ctl.on_output("d2", 20, False)  # 20 left
    ctl.admit("q", 100, 5)  # queued: no first output yet
    # Slots free after 10 and 20 steps; q takes the first (free again after 10 + 5 = 15 steps),
    # so a new request waits 15 decode steps of a full batch (2 sequences), then the prefill of
    # q's prompt and its own: 100 + 90 tokens of 2 sequences, in 3 chunks of at most 64.
    expected = 15 * step_seconds(2, 2) + (3 * A + B * 190 + C * 2)
    assert ctl.predict(90) == pytest.approx(expected)


def test_refusal_names_the_prediction_and_the_slo_and_frees_up_as_requests_finish():
    ctl = AdmissionController(0.5, max_num_seqs=1, max_num_batched_tokens=256, cost=fitted())
    ctl.admit("first", 16, 100)
    ctl.on_output("first", 1, False)  # decoding: 99 more steps ~ 1.1 s, above 0.8 * 0.5 s
    with pytest.raises(Overloaded) as e:
        ctl.admit("second", 16, 10)
    assert e.value.reason == "slo_ttft" and e.value.retry_after_s >= 1
    assert "--slo-ttft=0.5" in str(e.value) and "predicted time to first token" in str(e.value)
    assert ctl.num_rejected == 1 and ctl.num_in_flight == 1
    ctl.on_output("first", 100, True)
    ctl.admit("second", 16, 10)  # the slot is free again
    ctl.forget("second")
    assert ctl.num_in_flight == 0


def test_first_tokens_slower_than_predicted_raise_the_correction():
    ctl = AdmissionController(10.0, max_num_seqs=1, max_num_batched_tokens=256, cost=fitted())
    ctl.admit("busy", 16, 400)
    ctl.on_output("busy", 1, False)
    for i in range(100):  # each waits behind "busy"; its first token comes 1.5 x later than predicted
        ctl.admit(f"r{i}", 16, 1)
        a = ctl._admitted[f"r{i}"]
        a.admitted_at -= 1.5 * a.predicted_s
        ctl.on_output(f"r{i}", 1, True)
    assert ctl.correction == pytest.approx(1.5, rel=0.01)
    raw = ctl.predict(16) / ctl.correction
    assert ctl.predict(16) == pytest.approx(1.5 * raw, rel=0.01)


def test_a_simulated_burst_keeps_every_admitted_request_inside_the_slo():
    """A FIFO batch of max_num_seqs slots stepping at the fitted cost: every request admitted from
    a burst of 200 starts within the SLO, and one more would not have."""
    slo, seqs, out_len = 1.0, 4, 50
    ctl = AdmissionController(slo, max_num_seqs=seqs, max_num_batched_tokens=2048, cost=fitted())
    admitted = []
    for i in range(200):
        try:
            ctl.admit(f"r{i}", 32, out_len)
            admitted.append(i)
        except Overloaded:
            pass

    def simulated_ttft(j):  # slot j % seqs serves requests j, j + seqs, ...; prefill of all ahead
        return (j // seqs) * out_len * step_seconds(seqs, seqs) + step_seconds(32 * (j + 1), j + 1)

    assert len(admitted) >= seqs and len(admitted) < 200
    assert max(simulated_ttft(j) for j in range(len(admitted))) <= slo
    assert ctl.predict(32) > 0.8 * slo and simulated_ttft(len(admitted)) > 0.8 * slo


@pytest.mark.parametrize("slo,margin", [(0, 0.8), (-1, 0.8), (1.0, 0), (1.0, 1.5)])
def test_bad_settings_name_the_flag(slo, margin):
    with pytest.raises(ValueError, match="--slo-ttft"):
        AdmissionController(slo, 4, 64, margin=margin)


def test_requests_that_stop_early_shorten_the_expected_slot_wait():
    ctl = AdmissionController(100.0, max_num_seqs=1, max_num_batched_tokens=256, cost=fitted())
    ctl.admit("busy", 16, 400)
    ctl.on_output("busy", 1, False)
    full = ctl.predict(16)  # 399 more steps expected: max_tokens until something says otherwise
    for i in range(200):  # finished requests stop on EOS at a quarter of their max_tokens
        ctl.admit(f"r{i}", 16, 100, check=False)
        ctl.on_output(f"r{i}", 25, True, "stop")
    for i in range(50):  # aborted ones teach nothing
        ctl.admit(f"a{i}", 16, 100, check=False)
        ctl.on_output(f"a{i}", 1, True, "abort")
    assert ctl.length_ratio == pytest.approx(0.25, abs=0.01)
    # "busy" is now expected to end near 100 tokens: 99 more steps of a batch of 1, then the prefill.
    assert ctl.predict(16) == pytest.approx(99 * step_seconds(1, 1) + step_seconds(16, 1), rel=0.02)
    assert ctl.predict(16) < full / 3
    ctl.on_output("busy", 150, False)  # past its expected length: at least one more step
    assert ctl.predict(16) == pytest.approx(step_seconds(1, 1) + step_seconds(16, 1), rel=0.02)
