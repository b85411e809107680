"""Routing between a target and a small model in one engine (TP 1, float32, real tiny checkpoints),
against transformers: each model's greedy output, the cascade's hand-over (the small model's first
tokens, then the target's continuation of them), a `confidence` request sent to the target (served
whole by it), separate prefix-cache chains per model, the audit's numbers against a direct
teacher-forced computation, and the block manager's invariant with nothing left behind."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.tiny_models import build_tiny_model, load_hf
from tpserve.distributed import TPGroup
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.setup import EngineArgs, build_runtime
from tpserve.route.audit import audit_window
from tpserve.route.router import AUTO, SMALL, TARGET
from tpserve.server.offline import generate
from tpserve.server.requests import RequestFactory


@pytest.fixture(scope="module")
def models(tiny_dir):
    return build_tiny_model(tiny_dir, "llama_gqa"), build_tiny_model(tiny_dir, "llama_mqa", seed=1)


@pytest.fixture(scope="module")
def hf(models):
    return load_hf(models[0]), load_hf(models[1])


def make_engine(models, num_kv_blocks=256, **route):
    target, small = models
    _, engine = build_runtime(EngineArgs(model=str(target), dtype="float32", small_model=str(small),
                                         num_kv_blocks=num_kv_blocks, block_size=4, max_model_len=256,
                                         route_policy=route.pop("policy", None), **route),
                              TPGroup(device=torch.device("cpu")))
    return engine


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def hf_logprobs(model, ids):
    """Teacher-forced log-probability of token i + 1 at each position i."""
    logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(), logp[:-1].argmax(-1).tolist()


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_both_models_in_one_batch_give_their_own_greedy_tokens(models, hf):
    engine = make_engine(models)
    ps = prompts(8)
    factory = RequestFactory.for_engine(engine)
    for i, p in enumerate(ps):  # alternate models inside one continuous batch
        engine.add_sequence(factory.make(f"r{i}", prompt_token_ids=p, params=greedy(10),
                                         model=SMALL if i % 2 else TARGET))
    got = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.model == (SMALL if int(out.request_id[1:]) % 2 else TARGET)
        engine.block_manager.check_invariants(engine.scheduler.running)
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == hf_greedy(hf[i % 2], p, 10), f"request {i}"
    assert engine.leftovers() == {}


def test_each_model_has_its_own_prefix_cache_chains(models, hf):
    engine = make_engine(models)
    p = prompts(1, seed=3)[0] * 3  # long enough for several full blocks
    first = generate(engine, [p], greedy(4), model=SMALL)[0]
    target = generate(engine, [p], greedy(4), model=TARGET)[0]
    again = generate(engine, [p], greedy(4), model=SMALL)[0]
    assert first.num_cached_tokens == 0
    assert target.num_cached_tokens == 0, "the target must never read the small model's K/V"
    assert again.num_cached_tokens > 0, "the small model reuses its own blocks"
    assert again.token_ids == first.token_ids == hf_greedy(hf[1], p, 4)
    assert target.token_ids == hf_greedy(hf[0], p, 4)


def test_cascade_hands_over_after_the_small_models_first_tokens(models, hf):
    m = 3
    engine = make_engine(models, policy="cascade", route_cascade_tokens=m, route_small_fraction=0.5)
    ps = prompts(12, seed=1)
    results = generate(engine, ps, greedy(9), model=AUTO)
    outcomes = {r.model for r in results}
    assert outcomes == {SMALL, TARGET}, "a half fraction should route both ways"
    for p, r in zip(ps, results):
        assert r.route.policy == "cascade" and r.route.score is not None
        assert r.route.handed_over == (r.model == TARGET)
        small_first = hf_greedy(hf[1], p, m)
        assert r.token_ids[:m] == small_first, "the tokens already streamed stay"
        if r.model == TARGET:
            assert r.route.score < r.route.threshold
            assert r.token_ids[m:] == hf_greedy(hf[0], p + small_first, 9 - m)
        else:
            assert r.token_ids == hf_greedy(hf[1], p, 9)
    assert engine.scheduler.num_handovers == sum(r.model == TARGET for r in results)
    engine.block_manager.check_invariants(engine.scheduler.running)
    assert engine.leftovers() == {}


@pytest.mark.parametrize("budget", [2048, 12])  # 12: prompts arrive in chunks; the tail stays whole
def test_confidence_sends_whole_requests_to_the_target(models, hf, budget):
    engine = make_engine(models, policy="confidence", route_tail_tokens=8, route_small_fraction=0.5,
                         max_num_batched_tokens=budget)
    ps = prompts(12, seed=2)
    results = generate(engine, ps, greedy(6), model=AUTO)
    assert {r.model for r in results} == {SMALL, TARGET}
    for p, r in zip(ps, results):
        lps, _ = hf_logprobs(hf[1], p)
        tail = lps[-8:]
        q = sorted(tail)
        pos = 0.1 * (len(q) - 1)
        expect = q[int(pos)] + (q[min(int(pos) + 1, len(q) - 1)] - q[int(pos)]) * (pos - int(pos))
        assert r.route.score == pytest.approx(expect, abs=1e-4), "the score is the small model's tail quantile"
        assert r.token_ids == hf_greedy(hf[0] if r.model == TARGET else hf[1], p, 6)
    assert engine.leftovers() == {}


@pytest.mark.parametrize("budget", [2048, 12])
def test_gap_scores_both_models_and_hands_the_prompt_to_the_small_model(models, hf, budget):
    tail = 8
    engine = make_engine(models, policy="gap", route_tail_tokens=tail, route_small_fraction=0.5,
                         max_num_batched_tokens=budget)
    ps = prompts(12, seed=8)
    results = generate(engine, ps, greedy(6), model=AUTO)
    assert {r.model for r in results} == {SMALL, TARGET}
    for p, r in zip(ps, results):
        t_lp, _ = hf_logprobs(hf[0], p)
        s_lp, _ = hf_logprobs(hf[1], p)
        k = min(tail, len(p) - 1)
        diffs = [s - t for s, t in zip(s_lp[-k:], t_lp[-k:])]
        assert r.route.score == pytest.approx(sum(diffs) / k, abs=1e-4)
        assert r.route.handed_over == (r.model == SMALL)
        first = hf_greedy(hf[0], p, 1)
        if r.model == TARGET:
            assert r.token_ids == hf_greedy(hf[0], p, 6)
        else:  # the target's first token, then the small model on the K/V it computed beside the target
            assert r.token_ids == first + hf_greedy(hf[1], p + first, 5)
    engine.block_manager.check_invariants(engine.scheduler.running)
    assert engine.leftovers() == {}
    # A prompt the small model went on to serve joined the target's prefix chains while the target
    # prefilled it (the target's K/V is there too), and nothing after: a target request extending
    # it reuses those blocks and still gives the target's tokens.
    p = max((p for p, r in zip(ps, results) if r.model == SMALL), key=len)
    again = generate(engine, [p + [5, 6, 7, 8, 9]], greedy(4), model=TARGET)[0]
    assert again.num_cached_tokens >= 4 * (len(p) // 4) - 4
    assert again.token_ids == hf_greedy(hf[0], p + [5, 6, 7, 8, 9], 4)


@pytest.mark.parametrize("policy", ["random", "length"])
def test_decided_at_submission(models, hf, policy):
    engine = make_engine(models, policy=policy, route_small_fraction=0.5)
    ps = prompts(16, seed=4)
    results = generate(engine, ps, greedy(4), model=AUTO)
    for p, r in zip(ps, results):
        assert not r.route.handed_over
        assert (r.model == SMALL) == (r.route.score >= r.route.threshold)
        if policy == "length":
            assert r.route.score == -len(p)
        assert r.token_ids == hf_greedy(hf[0] if r.model == TARGET else hf[1], p, 4)
    assert 3 <= sum(r.model == SMALL for r in results) <= 13


def test_auto_without_a_policy_is_the_target(models, hf):
    engine = make_engine(models)
    r = generate(engine, [prompts(1)[0]], greedy(3), model=AUTO)[0]
    assert r.model == TARGET and r.route is None


def test_a_prompt_with_nothing_to_score_goes_to_the_target(models, hf):
    engine = make_engine(models, policy="confidence", route_small_fraction=1.0)
    r = generate(engine, [[17]], greedy(3), model=AUTO)[0]
    assert r.route.score is None and r.model == TARGET and r.token_ids == hf_greedy(hf[0], [17], 3)
    assert len(engine.small.router.tracker) == 0


@pytest.mark.parametrize("policy", ["random", "gap"])  # gap: the target sampled the first output token
def test_audit_equals_a_direct_teacher_forced_computation(models, hf, policy):
    engine = make_engine(models, policy=policy, route_small_fraction=1.0, route_audit_rate=1.0, route_tail_tokens=6)
    ps = prompts(5, seed=5)
    ps[0] = ps[0] * 4  # long enough for a window before the tail
    results = generate(engine, ps, SamplingParams(max_tokens=7, temperature=0.8, seed=3, ignore_eos=True),
                       model=AUTO)
    while engine.has_work():  # the audits run in the background once nothing waits
        engine.step()
    audits = {a.request_id: a for a in engine.small.recent_audits}
    assert len(audits) == len(ps)
    for p, r in zip(ps, results):
        a = audits[r.request_id]
        ids = p + r.token_ids
        t_lp, t_argmax = hf_logprobs(hf[0], ids)
        s_lp, _ = hf_logprobs(hf[1], ids)
        n = len(p)
        start, end = audit_window(n, 6)
        first = n - 1 + (policy == "gap")  # the position before the small model's first output token
        assert r.model == SMALL and a.window_tokens == end - start and a.output_tokens == len(ids) - 1 - first
        assert a.window_target_bits == pytest.approx(-sum(t_lp[start - 1 : end - 1]) / math.log(2), abs=1e-3)
        assert a.window_small_bits == pytest.approx(-sum(s_lp[start - 1 : end - 1]) / math.log(2), abs=1e-3)
        assert a.output_small_bits == pytest.approx(-sum(s_lp[first:]) / math.log(2), abs=1e-3)
        assert a.output_target_bits == pytest.approx(-sum(t_lp[first:]) / math.log(2), abs=1e-3)
        assert a.output_agreement == sum(t == x for t, x in zip(t_argmax[first:], ids[first + 1 :]))
    assert audit_window(len(ps[0]), 6)[1] < len(ps[0]) - 6 + 1
    assert engine.small.audit_totals.summary()["num_audits"] == len(ps)
    assert engine.leftovers() == {}


def test_hand_overs_with_preemption_and_aborts_leave_nothing_behind(models):
    engine = make_engine(models, num_kv_blocks=40, policy="cascade", route_cascade_tokens=2)
    factory = RequestFactory.for_engine(engine)
    rng = random.Random(7)
    for i, p in enumerate(prompts(30, seed=6)):
        engine.add_sequence(factory.make(f"r{i}", prompt_token_ids=p, params=greedy(rng.randint(3, 20)),
                                         model=[AUTO, SMALL, TARGET][i % 3]))
    finished, step = set(), 0
    while engine.has_work():
        if step in (3, 9, 15):
            engine.abort_request(f"r{step}")
        for out in engine.step():
            assert out.request_id not in finished
            if out.finished:
                finished.add(out.request_id)
        engine.block_manager.check_invariants(engine.scheduler.running)
        step += 1
        assert step < 3000
    assert len(finished) == 30
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_handovers > 0
    assert engine.leftovers() == {}



def test_one_copy_is_both_the_draft_and_the_small_model(models, hf):
    target, small = models
    _, engine = build_runtime(EngineArgs(model=str(target), dtype="float32", small_model=str(small),
                                         draft_model=str(small), speculative_method="draft", spec_policy="fixed",
                                         num_speculative_tokens=3, num_kv_blocks=256, block_size=4,
                                         max_model_len=256), TPGroup(device=torch.device("cpu")))
    assert engine.spec.proposer.runner is engine.small.runner
    ps = prompts(6, seed=9)
    factory = RequestFactory.for_engine(engine)
    for i, p in enumerate(ps):
        engine.add_sequence(factory.make(f"r{i}", prompt_token_ids=p, params=greedy(12),
                                         model=SMALL if i % 2 else TARGET))
    got = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, p in enumerate(ps):  # speculation on the target's requests stays lossless
        assert got[f"r{i}"] == hf_greedy(hf[i % 2], p, 12), f"request {i}"
    assert engine.spec.totals.num_spec_steps > 0
    assert engine.leftovers() == {}


def test_calibrate_cli_writes_quantiles_a_server_loads(models, tmp_path):
    import json

    from tpserve.route.calibrate import main as calibrate
    from tpserve.route.router import RouteConfig, Router, load_calibration

    target, small = models
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts(30, seed=11)))
    out = calibrate(["--model", str(target), "--small-model", str(small), "--prompts", str(tmp_path / "p.jsonl"),
                     "--out", str(tmp_path / "cal.json"), "--dtype", "float32", "--route-tail-tokens", "8",
                     "--policies", "confidence,gap"])
    cal = load_calibration(str(tmp_path / "cal.json"))
    assert cal == json.loads(json.dumps(out)) and cal["num_prompts"] == 30 and cal["tail_tokens"] == 8
    for policy in ("confidence", "gap"):
        q = cal["quantiles"][policy]
        assert len(q) == 101 and q == sorted(q)
        thresholds = [cal["thresholds"][policy][k] for k in sorted(cal["thresholds"][policy])]
        assert thresholds == sorted(thresholds, reverse=True)
    # The engine scores these prompts as the calibration did: its threshold for a fraction matches.
    engine = make_engine(models, policy="gap", route_tail_tokens=8, route_small_fraction=0.5)
    engine.small.router = Router(RouteConfig(policy="gap", tail_tokens=8, small_fraction=0.5), cal)
    assert engine.small.router.threshold == pytest.approx(cal["thresholds"]["gap"]["0.50"], abs=1e-6)
    results = generate(engine, prompts(30, seed=11), greedy(3), model=AUTO)
    scores = sorted(r.route.score for r in results)
    assert scores[0] == pytest.approx(q[0], abs=1e-5) and scores[-1] == pytest.approx(q[-1], abs=1e-5)
    assert 10 <= sum(r.model == SMALL for r in results) <= 20
