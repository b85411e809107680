"""The router's arithmetic without a model: the online quantile, thresholds from a fraction (and
from a calibration file, monotonically), each policy's decision, the settings a calibration must
match, and the audit's comparison."""

from __future__ import annotations

import json
import math
import random

import pytest

from tpserve.engine.sampler import TokenLogprobs
from tpserve.errors import ConfigError
from tpserve.route.audit import AuditInfo, AuditTotals, audit_result, audit_window
from tpserve.route.calibrate import calibration
from tpserve.route.router import (AUTO, SMALL, TARGET, RouteConfig, Router, RouteState, ScoreTracker,
                                  load_calibration, quantile)


def test_quantile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 5.0 and quantile(xs, 0.5) == 3.0
    assert quantile(xs, 0.1) == pytest.approx(1.4)


def test_tracker_threshold_sends_the_fraction_and_follows_the_window():
    rng = random.Random(0)
    tracker = ScoreTracker(window=500)
    for _ in range(500):
        tracker.add(rng.random())
    for fraction in (0.1, 0.25, 0.5, 0.9):
        t = tracker.threshold(fraction)
        assert sum(s >= t for s in tracker._sorted) / 500 == pytest.approx(fraction, abs=0.01)
    for _ in range(500):  # the traffic shifts: the window forgets the old scores
        tracker.add(10 + rng.random())
    assert tracker.threshold(0.5) > 10
    assert tracker.threshold(0.0) == math.inf and tracker.threshold(1.0) == -math.inf
    assert len(tracker) == 500


def test_calibrated_thresholds_fall_as_the_fraction_grows():
    rng = random.Random(1)
    scores = [rng.gauss(-3, 1) for _ in range(300)]
    cal = calibration({"confidence": scores}, RouteConfig(policy="confidence"), "t", "s")
    table = cal["thresholds"]["confidence"]
    values = [table[k] for k in sorted(table)]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    for key, t in table.items():
        assert sum(s >= t for s in scores) / len(scores) == pytest.approx(float(key), abs=0.01)
    q = cal["quantiles"]["confidence"]
    assert len(q) == 101 and q == sorted(q) and q[0] == min(scores) and q[-1] == max(scores)
    assert ScoreTracker(len(scores), scores).threshold(0.5) == pytest.approx(q[50])


def test_router_uses_the_calibrated_scores_until_live_ones_replace_them():
    cal = {"aggregate_quantile": 0.1, "tail_tokens": 64, "cascade_tokens": 8,
           "quantiles": {"length": [-float(100 - i) for i in range(101)]}}  # prompt lengths 0..100
    router = Router(RouteConfig(policy="length", small_fraction=0.25, window=50), cal)
    assert router.threshold == pytest.approx(-25.0, abs=1.5)
    for _ in range(50):  # live traffic: every prompt is 1000 tokens long
        router.start(RouteState(AUTO), 1000)
    assert router.threshold == -1000.0


def test_each_policy_decides_when_its_score_is_known():
    r = Router(RouteConfig(policy="random", small_fraction=0.3, seed=0))
    picks = [r.start(RouteState(AUTO), 10) for _ in range(2000)]
    assert picks.count(SMALL) / 2000 == pytest.approx(0.3, abs=0.03)
    assert r.threshold == pytest.approx(0.7)

    r = Router(RouteConfig(policy="confidence", threshold=-2.0, tail_tokens=4))
    st = RouteState("confidence")
    assert r.start(st, 10) == SMALL and st.tail_tokens == 4 and not st.decided
    st.tail_logprobs = [-0.5, -1.0, -1.5, -9.0]
    assert r.after_prefill(st) == TARGET and st.score == pytest.approx(quantile(st.tail_logprobs, 0.1))
    assert r.after_prefill(st) is None  # decided once

    r = Router(RouteConfig(policy="cascade", threshold=-2.0, cascade_tokens=3))
    st = RouteState("cascade")
    assert r.start(st, 10) == SMALL
    st.output_logprobs = [-0.1, -0.2]
    assert r.after_tokens(st, finished=False) is None  # not enough tokens yet
    st.output_logprobs.append(-0.3)
    assert r.after_tokens(st, finished=False) == SMALL
    explicit = RouteState(None)
    explicit.output_logprobs = [-50.0] * 5
    assert r.after_tokens(explicit, finished=False) is None, "a request that named its model is never moved"


@pytest.mark.parametrize("field,value,flag", [("policy", "best", "--route-policy"),
                                              ("small_fraction", 1.5, "--route-small-fraction"),
                                              ("audit_rate", -0.1, "--route-audit-rate"),
                                              ("tail_tokens", 0, "--route-tail-tokens")])
def test_bad_settings_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        RouteConfig(**{field: value})


def test_a_calibration_made_with_other_settings_is_refused(tmp_path):
    cal = {"aggregate_quantile": 0.25, "tail_tokens": 64, "cascade_tokens": 8, "quantiles": {"confidence": [0.0]}}
    with pytest.raises(ConfigError, match="--route-quantile 0.25"):
        Router(RouteConfig(policy="confidence"), cal)
    with pytest.raises(ConfigError, match="no scores for policy 'cascade'"):
        Router(RouteConfig(policy="cascade", aggregate_quantile=0.25), cal)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"x": 1}))
    with pytest.raises(ConfigError, match="not a calibration file"):
        load_calibration(str(path))


def test_audit_window_precedes_the_scored_tail():
    assert audit_window(300, 64) == (172, 236)
    assert audit_window(100, 64) == (1, 36)  # what there is before the tail
    assert audit_window(40, 64) == (1, 40)  # too short: the whole prompt


def test_audit_result_compares_the_same_positions():
    # prompt of 5 tokens, window [2, 4) (tokens 2 and 3), outputs at 5 and 6, the first by the target.
    ids = [10, 11, 12, 13, 14, 15, 16]
    target = [TokenLogprobs(ids[i + 1], -0.1 * (i + 1), [(ids[i + 1] if i != 5 else 99, -0.01)]) for i in range(6)]
    info = AuditInfo("r", 5, output_offset=1, window=(2, 4), small_logprobs=[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    r = audit_result(info, ids, target, bytes_of=lambda toks: 2 * len(toks))
    ln2 = math.log(2)
    assert r.window_small_bits == pytest.approx((2.0 + 3.0) / ln2)  # tokens 2, 3 are scored at positions 1, 2
    assert r.window_target_bits == pytest.approx((0.2 + 0.3) / ln2)
    assert r.output_tokens == 1 and r.output_small_bits == pytest.approx(6.0 / ln2)  # only token 6 is the small model's
    assert r.output_target_bits == pytest.approx(0.6 / ln2)
    assert r.output_agreement == 0 and r.window_bytes == 4 and r.output_bytes == 2
    totals = AuditTotals()
    totals.add(r)
    s = totals.summary()
    assert s["quality_gap"] == pytest.approx((5.0 - 0.5) / 0.5)
    assert s["output_greedy_agreement"] == 0.0


def test_min_quality_lowers_the_fraction_while_the_audit_is_below_the_floor():
    r = Router(RouteConfig(policy="length", small_fraction=0.5, audit_rate=0.5, min_quality=0.9))
    for _ in range(40):  # the small model's bits are 20 % above the target's: quality 0.8
        r.on_audit(small_bits=12.0, target_bits=10.0)
    low = r.fraction
    assert low < 0.5 * 0.9 ** 20
    for _ in range(200):  # the audits recover: the fraction climbs back to the asked one, no higher
        r.on_audit(small_bits=10.2, target_bits=10.0)
    assert r.fraction == 0.5
    with pytest.raises(ConfigError, match="--route-audit-rate"):
        RouteConfig(policy="length", min_quality=0.9)
