"""Scheduler driven without a model: a fake step computes what was scheduled and appends a
deterministic token per sampled sequence."""

from __future__ import annotations

import pytest

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import RequestRejected, Scheduler, SchedulerConfig
from tpserve.engine.sequence import Sequence


def make(num_blocks=64, block_size=4, max_num_seqs=16, budget=32, max_model_len=1024, caching=True):
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len), bm)


def new_seq(i, prompt_len, max_tokens=4):
    return Sequence(i, f"r{i}", [(i * 31 + t) % 997 for t in range(prompt_len)], SamplingParams(max_tokens=max_tokens))


def fake_token(seq):
    return (seq.seq_id * 7 + seq.num_tokens) % 997


def step(sched):
    out = sched.schedule()
    out.decoding = [item.seq.num_output_tokens > 0 for item in out.scheduled]
    finished = []
    for item in out.scheduled:
        s = item.seq
        samples = item.samples
        s.num_computed_tokens += item.num_new_tokens
        sched.block_manager.commit(s, s.num_computed_tokens)
        if samples:
            s.token_ids.append(fake_token(s))
            if s.num_output_tokens >= s.params.max_tokens:
                finished.append(s)
    for s in finished:
        sched.remove(s)
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
