"""Rank 0's engine on a fake model (tests/fake_engine.py): continuous batching with preemption,
aborts and speculation gives the model's greedy tokens; every request ends in exactly one finished
output; lifecycle timestamps are consistent; and finished requests leave nothing behind."""

from __future__ import annotations

import random

import pytest

from tests.fake_engine import fake_engine, greedy_reference
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.spec_decode.controller import SpecController
from tpserve.engine.spec_decode.decoder import SpecDecoder
from tpserve.engine.spec_decode.proposers import NgramProposer
from tpserve.server.offline import generate
from tpserve.server.requests import RequestFactory


def workload(n, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(3, 60) for _ in range(rng.randint(1, 20))], rng.randint(5, 20)) for _ in range(n)]


def run(engine, work, abort_at=None):
    """Serve `work` [(prompt, max_tokens)]; abort_at {index: step}. Returns (outputs by index,
    preemptions seen). Checks the block manager after every step."""
    factory = RequestFactory.for_engine(engine)
    for i, (prompt, n) in enumerate(work):
        engine.add_sequence(factory.make(f"r{i}", prompt_token_ids=prompt,
                                         params=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
    outputs = {i: [] for i in range(len(work))}
    preemptions, step = 0, 0
    while engine.has_work():
        for i, at in (abort_at or {}).items():
            if at == step:
                engine.abort_request(f"r{i}")
        before = engine.scheduler.num_preemptions
        for out in engine.step():
            outputs[int(out.request_id[1:])].append(out)
        preemptions += engine.scheduler.num_preemptions - before
        engine.block_manager.check_invariants(engine.scheduler.running)
        step += 1
        assert step < 5000, "no progress"
    return outputs, preemptions


def ngram_spec(k=3, adaptive=False, max_model_len=256):
    return SpecDecoder(NgramProposer(max_ngram=3), SpecController(k, adaptive=adaptive, free_proposals=True),
                       max_model_len)


@pytest.mark.parametrize("spec", [None, "fixed", "adaptive"])
def test_preemption_and_aborts_give_the_models_tokens_and_leave_nothing_behind(spec):
    work = workload(24)
    aborted = {3: 2, 7: 9, 11: 0, 19: 25}  # request index -> step at which it is aborted
    engine = fake_engine(num_blocks=30, block_size=4, budget=48,
                         spec=None if spec is None else ngram_spec(adaptive=spec == "adaptive"))
    outputs, preemptions = run(engine, work, aborted)
    assert preemptions > 0, "the small cache should force preemption"
    for i, (prompt, n) in enumerate(work):
        outs = outputs[i]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True], f"request {i}"
        tokens = [t for o in outs for t in o.new_token_ids]
        want = greedy_reference(prompt, n)
        if i in aborted:
            assert outs[-1].finish_reason == "abort" and tokens == want[: len(tokens)]
        else:
            assert outs[-1].finish_reason == "length" and tokens == want, f"request {i}"
            assert outs[-1].num_output_tokens == n and outs[-1].times.finished is not None
    if spec == "fixed":
        assert engine.stats().speculation.num_accepted_tokens > 0
    assert engine.leftovers() == {}
    engine.block_manager.check_invariants([])


def test_leftovers_names_what_a_live_request_holds():
    engine = fake_engine()
    factory = RequestFactory.for_engine(engine)
    engine.add_sequence(factory.make("a", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=50)))
    assert engine.leftovers() == {"requests": 1, "waiting": 1}
    engine.step()
    held = engine.leftovers()
    assert held["requests"] == held["running"] == held["worker_block_tables"] == 1 and held["kv_blocks_in_use"] > 0
    assert engine.abort_request("a") and not engine.abort_request("a")
    assert engine.leftovers()["outputs_to_emit"] == 1 and engine.leftovers()["tables_to_drop"] == 1
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort"
    assert engine.leftovers() == {} and not engine.has_work()


def test_lifecycle_timestamps():
    engine = fake_engine(max_num_seqs=1, num_blocks=12, block_size=4)
    results = generate(engine, [[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    first, second = (r.times for r in results)
    for r, t in zip(results, (first, second)):
        assert t.arrival <= t.first_scheduled <= t.first_token <= t.finished
        assert len(t.token_times) == len(r.token_ids) == 6 and t.token_times == sorted(t.token_times)
        assert len(t.inter_token_times) == 5 and min(t.inter_token_times) >= 0
        assert t.queue_time >= 0 and t.prefill_time >= 0 and t.decode_time >= 0
        assert t.e2e_latency == pytest.approx(t.queue_time + t.prefill_time + t.decode_time)
        assert r.time_to_first_token == t.time_to_first_token
    # One sequence at a time: the second waits in the queue until the first has finished.
    assert second.first_scheduled >= first.finished
    assert second.queue_time >= first.finished - second.arrival > 0


def test_preemptions_are_timestamped():
    engine = fake_engine(num_blocks=10, block_size=4, budget=64)
    seqs = []
    factory = RequestFactory.for_engine(engine)
    for i in range(3):
        seq = factory.make(f"r{i}", prompt_token_ids=[3 + i] * 6, params=SamplingParams(max_tokens=10, ignore_eos=True))
        engine.add_sequence(seq)
        seqs.append(seq)
    while engine.has_work():
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    for s in seqs:
        assert len(s.times.preemptions) == s.num_preemptions
        assert all(s.times.first_scheduled <= p <= s.times.finished for p in s.times.preemptions)
