"""Scheduler driven without a model: a fake forward samples a deterministic token for every
sequence that samples, and the scheduler's own update applies it."""

from __future__ import annotations

import pytest

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import RequestRejected, Scheduler, SchedulerConfig
from tpserve.engine.sequence import Sequence
from tpserve.engine.step import StepPlan


def make(num_blocks=64, block_size=4, max_num_seqs=16, budget=32, max_model_len=1024, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len), bm)


def new_seq(i, prompt_len, max_tokens=4):
    return Sequence(i, f"r{i}", [(i * 31 + t) % 997 for t in range(prompt_len)], SamplingParams(max_tokens=max_tokens))


def fake_token(seq):
    return (seq.seq_id * 7 + seq.num_tokens) % 997


def step(sched, num_lookahead=0):
    out = sched.schedule(num_lookahead)
    out.decoding = [item.decoding for item in out.scheduled]
    for item in out.scheduled:
        if item.samples:
            item.tokens, item.logprobs = [fake_token(item.seq)], [None]
    finished = [s for s in sched.update(out, now=0.0) if s.is_finished]
    sched.block_manager.check_invariants(list(sched.running))
    return out, finished


def run_all(sched, max_steps=10_000):
    steps = []
    while sched.has_work():
        steps.append(step(sched))
        assert len(steps) < max_steps, "scheduler made no progress"
    return steps


def test_chunked_prefill_and_sampling_only_at_the_end():
    sched = make(budget=32)
    s = new_seq(0, 100, max_tokens=2)
    sched.add(s)
    chunks = []
    for _ in range(4):
        out, _ = step(sched)
        chunks.append((out.scheduled[0].num_new_tokens, s.num_output_tokens))
    assert chunks == [(32, 0), (32, 0), (32, 0), (4, 1)]


def test_budget_respected_and_decodes_mixed_with_prefill():
    sched = make(budget=20, num_blocks=200)
    for i in range(10):
        sched.add(new_seq(i, 3 + 5 * i, max_tokens=6))
    mixed = False
    for out, _ in run_all(sched):
        assert out.num_tokens <= 20
        mixed |= set(out.decoding) == {True, False}
    assert mixed


def test_max_num_seqs():
    sched = make(max_num_seqs=3, budget=100)
    for i in range(6):
        sched.add(new_seq(i, 4))
    out, _ = step(sched)
    assert len(out.scheduled) == 3 and len(sched.waiting) == 3


def test_preempts_most_recently_admitted_and_resumes_identically():
    def outputs(num_blocks):
        sched = make(num_blocks=num_blocks, block_size=4, budget=64)
        seqs = [new_seq(i, 6, max_tokens=10) for i in range(4)]
        for s in seqs:
            sched.add(s)
        preempted = []
        for out, _ in run_all(sched):
            preempted += [p.seq_id for p in out.preempted]
        return [s.output_token_ids for s in seqs], preempted

    roomy, none = outputs(64)
    tight, preempted = outputs(12)  # 4 sequences x 4 blocks at the end > 12 blocks
    assert none == [] and preempted, "the small cache must force preemption"
    assert preempted[0] == 3, "the most recently admitted sequence goes first"
    assert tight == roomy


def test_infeasible_request_rejected_with_limits():
    sched = make(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(RequestRejected, match=r"needs 5 KV blocks of 4 tokens, but the cache has 4 \(16 tokens\)"):
        sched.add(new_seq(0, 12, max_tokens=5))
    with pytest.raises(RequestRejected, match="= 101 exceeds the max model length 100"):
        sched.add(new_seq(1, 96, max_tokens=5))
    assert not sched.has_work()


def test_long_prompt_not_starved_by_stream_of_short_ones():
    sched = make(num_blocks=100, block_size=4, budget=16, max_num_seqs=8)
    long_seq = new_seq(0, 200, max_tokens=2)
    sched.add(new_seq(1, 4, max_tokens=30))
    sched.add(long_seq)
    admitted_at = None
    for t in range(400):
        sched.add(new_seq(100 + t, 4, max_tokens=3))  # a new short request every step
        step(sched)
        if long_seq.num_computed_tokens > 0 and admitted_at is None:
            admitted_at = t
        if long_seq.is_finished:
            break
    assert admitted_at is not None and admitted_at <= 2
    assert long_seq.is_finished, "the long prompt must complete under the stream"


def test_lookahead_reserves_slots():
    sched = make(num_blocks=16, block_size=4, budget=64)
    s = new_seq(0, 4, max_tokens=8)
    sched.add(s)
    step(sched)  # prefill + first token
    out = sched.schedule(num_lookahead=3)
    item = out.scheduled[0]
    assert item.num_lookahead == 3
    assert len(s.block_table) * 4 >= s.num_computed_tokens + item.num_new_tokens + 3


class Proposal:
    def __init__(self, tokens):
        self.tokens = tokens


def test_plan_diffs_keep_the_workers_tables_equal_to_rank_0s():
    """Full table the first time and after a preemption, appended ids and rollback truncation
    otherwise, drops after preemption and finish: a worker applying the plans always holds exactly
    the scheduled sequences' tables, and nothing once every sequence has finished."""
    from tests.fake_engine import WorkerTables

    sched = make(num_blocks=14, block_size=4, budget=64)
    seqs = [new_seq(i, 6, max_tokens=12) for i in range(4)]
    for s in seqs:
        sched.add(s)
    worker, full_tables, preempted = WorkerTables(), 0, 0
    while sched.has_work():
        out = sched.schedule(num_lookahead=lambda seq: 2)  # every decode reserves 2, rejected at once
        plan = sched.plan(out)
        full_tables += sum(w.block_table is not None for w in plan.seqs)
        preempted += len(out.preempted)
        worker.apply_block_diffs(plan)
        for item in out.scheduled:
            assert worker.block_tables[item.seq.seq_id] == item.seq.block_table
            if item.samples:
                item.tokens, item.logprobs = [fake_token(item.seq)], [None]
        sched.update(out, now=0.0)
        sched.block_manager.check_invariants(list(sched.running))
    assert preempted > 0 and full_tables == len(seqs) + preempted
    worker.apply_block_diffs(StepPlan(finished=sched.take_tables_to_drop()))
    assert worker.block_tables == {}


def test_update_keeps_accepted_proposals_and_releases_the_rest_of_the_lookahead():
    sched = make(num_blocks=16, block_size=4, budget=64)
    s = new_seq(0, 4, max_tokens=20)
    sched.add(s)
    step(sched)  # prefill + first token: 5 tokens, 4 computed
    out = sched.schedule(num_lookahead=6)
    (item,) = out.scheduled
    assert item.decoding and item.num_lookahead == 6 and len(s.block_table) == 3  # 5 + 6 slots
    item.proposal = Proposal([11, 12, 13, 14, 15, 16])
    plan = sched.plan(out)
    assert plan.seqs[0].token_ids == [s.token_ids[-1], 11, 12, 13, 14, 15, 16] and plan.seqs[0].num_logits == 7
    item.tokens, item.logprobs = [11, 12, 99], [None] * 3  # two accepted, then the target's own token
    sched.update(out, now=0.0)
    assert s.output_token_ids == [s.output_token_ids[0], 11, 12, 99]
    assert s.num_computed_tokens == 7 and s.num_tokens == 8
    assert len(s.block_table) == 2 and s.num_sent_blocks == 2  # the third block went back
    sched.block_manager.check_invariants([s])


def run_one(params, tokens, eos=(), max_model_len=1024):
    """Feed `tokens` (one per step) to a 2-token prompt; -> (output tokens, finish reason)."""
    sched = Scheduler(SchedulerConfig(4, 64, max_model_len), BlockManager(32, 4), eos_token_ids=eos)
    s = Sequence(0, "r", [1, 2], params)
    sched.add(s)
    for token in tokens:
        out = sched.schedule()
        out.scheduled[0].tokens, out.scheduled[0].logprobs = [token], [None]
        sched.update(out, now=0.0)
        if s.is_finished:
            break
    return s.output_token_ids, s.finish_reason


def test_stop_conditions():
    p = SamplingParams
    assert run_one(p(max_tokens=5), [7, 2, 9], eos=(2,)) == ([7, 2], "stop")
    assert run_one(p(max_tokens=5, ignore_eos=True), [7, 2, 9, 9, 9], eos=(2,)) == ([7, 2, 9, 9, 9], "length")
    assert run_one(p(max_tokens=5, min_tokens=3), [2, 2, 2, 9], eos=(2,)) == ([2, 2, 2], "stop")
    assert run_one(p(max_tokens=5, stop_token_ids=[9]), [7, 9, 8]) == ([7, 9], "stop")
    # Several tokens in one step (accepted proposals): those after the stopping token are dropped.
    sched = Scheduler(SchedulerConfig(4, 64, 1024), BlockManager(32, 4), eos_token_ids=(2,))
    s = Sequence(0, "r", [1, 2, 3], SamplingParams(max_tokens=10))
    sched.add(s)
    step(sched)
    out = sched.schedule(num_lookahead=3)
    out.scheduled[0].tokens, out.scheduled[0].logprobs = [5, 2, 6], [None] * 3
    assert sched.update(out, now=0.0) == [s]
    assert s.output_token_ids[1:] == [5, 2] and s.finish_reason == "stop" and not s.block_table
