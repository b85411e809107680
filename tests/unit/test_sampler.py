"""Sampler: logits processing against transformers' processors; seeded reproducibility."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tpserve.engine.sampler import Sampler, process_logits
from tpserve.engine.sampling_params import SamplingError, SamplingParams
from tpserve.engine.sequence import Sequence

V = 50


def seqs_with(params_list, prompt=(1, 2, 3), outputs=()):
    out = []
    for i, p in enumerate(params_list):
        s = Sequence(i, f"r{i}", list(prompt), p)
        s.token_ids += list(outputs)
        out.append(s)
    return out


def same_mask_and_values(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite])


@pytest.mark.parametrize("top_k", [1, 5, 49])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_and_top_k_match_transformers(top_k, temperature):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(top_k))
    got = process_logits(logits, seqs_with([SamplingParams(temperature=temperature, top_k=top_k)] * 4), ())
    want = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    same_mask_and_values(got, want)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(top_p):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(int(top_p * 1000))) * 3
    got = process_logits(logits, seqs_with([SamplingParams(top_p=top_p)] * 4), ())
    same_mask_and_values(got, TopPLogitsWarper(top_p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(min_p):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(7)) * 3
    got = process_logits(logits, seqs_with([SamplingParams(min_p=min_p)] * 4), ())
    same_mask_and_values(got, MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.8, 1.3])
def test_repetition_penalty_matches_transformers(penalty):
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3))
    prompt, outputs = [4, 5, 6, 4], [7, 5]
    got = process_logits(logits, seqs_with([SamplingParams(repetition_penalty=penalty)], prompt, outputs), ())
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + outputs]), logits.clone())
    torch.testing.assert_close(got, want)


def test_presence_and_frequency_penalties_on_output_tokens_only():
    logits = torch.zeros(1, V)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = process_logits(logits, seqs_with([p], prompt=[9, 9], outputs=[3, 3, 3, 8]), ())
    want = torch.zeros(1, V)
    want[0, 3] = -(0.5 + 3 * 0.25)
    want[0, 8] = -(0.5 + 0.25)
    torch.testing.assert_close(got, want)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    p = SamplingParams(min_tokens=2, stop_token_ids=[7])
    got = process_logits(logits, seqs_with([p], outputs=[11]), eos_token_ids=(2,))
    assert got[0, 2] == float("-inf") and got[0, 7] == float("-inf")
    got = process_logits(logits, seqs_with([p], outputs=[11, 12]), eos_token_ids=(2,))
    assert torch.isfinite(got).all()


def test_greedy_is_argmax_and_sampling_stays_in_top_k():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    sampler = Sampler()
    tokens, _ = sampler.sample(logits, seqs_with([SamplingParams(temperature=0.0)] * 3))
    assert tokens == logits.argmax(-1).tolist()
    allowed = set(logits[0].topk(3).indices.tolist())
    s = seqs_with([SamplingParams(temperature=5.0, top_k=3)])
    for _ in range(200):
        tok, _ = sampler.sample(logits[:1], s)
        assert tok[0] in allowed


def test_seeded_request_independent_of_batch_mates():
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def draw(mates_before, mates_after):
        sampler = Sampler(seed=len(mates_before) + 10 * len(mates_after))
        batch = seqs_with(mates_before + [seeded] + mates_after)
        pos = len(mates_before)
        out = []
        for _ in range(30):  # the same distribution at 30 successive positions
            logits = torch.randn(len(batch), V)
            logits[pos] = row[0]
            token = sampler.sample(logits, batch)[0][pos]
            out.append(token)
            for s in batch:
                s.token_ids.append(token)
        return out

    alone = draw([], [])
    assert len(set(alone)) > 3, "sampling at temperature 1 should vary"
    assert draw([SamplingParams(temperature=1.0)], [SamplingParams(temperature=0.0)]) == alone
    assert draw([], [SamplingParams(temperature=0.5, top_k=3)] * 3) == alone


def test_seeded_sequence_reproducible_across_batches():
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(20, V, generator=gen)
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(extra_rows):
        sampler = Sampler(seed=extra_rows)
        s = seqs_with([seeded])[0]
        others = seqs_with([SamplingParams(temperature=1.0)] * extra_rows)
        out = []
        for t in range(20):
            batch = others + [s]
            logits = torch.cat([torch.randn(extra_rows, V), rows[t : t + 1]])
            out.append(sampler.sample(logits, batch)[0][-1])
            s.token_ids.append(out[-1])
        return out

    assert run(0) == run(3) == run(7)


def test_a_seeded_draw_depends_on_the_seed_and_the_position_only():
    sampler = Sampler(seed=0)
    a, b = seqs_with([SamplingParams(temperature=1.0, seed=5)] * 2, outputs=(7,))
    b.token_ids[-1] = 9  # different context, same position
    assert torch.equal(sampler.noise(a, a.num_tokens, V), sampler.noise(b, b.num_tokens, V))
    assert not torch.equal(sampler.noise(a, 4, V), sampler.noise(a, 5, V))
    c = seqs_with([SamplingParams(temperature=1.0, seed=6)], outputs=(7,))[0]
    assert not torch.equal(sampler.noise(a, 4, V), sampler.noise(c, 4, V))


def test_empirical_distribution_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(seed=0)
    s = seqs_with([SamplingParams(temperature=1.0)])
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[sampler.sample(logits, s)[0][0]] += 1
    tv = 0.5 * (counts / counts.sum() - logits.softmax(-1)[0]).abs().sum()
    assert tv < 0.02


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    p = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0)
    tokens, lps = Sampler().sample(logits, seqs_with([p, SamplingParams(temperature=0.0)]))
    ref = logits.log_softmax(-1)
    assert lps[1] is None
    assert lps[0].token_id == tokens[0]
    assert lps[0].logprob == pytest.approx(float(ref[0, tokens[0]]), abs=1e-6)
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()


@pytest.mark.parametrize("kwargs,msg", [
    ({"temperature": -1}, "temperature=-1 must be in"),
    ({"top_p": 0}, "top_p=0 must be in"),
    ({"top_k": -2}, "top_k=-2"),
    ({"min_p": 1.5}, "min_p=1.5"),
    ({"max_tokens": 0}, "max_tokens=0 must be >= 1"),
    ({"stop": ["x"] * 17}, "17 stop strings given; at most 16"),
    ({"stop": ["y" * 300]}, "length 300 exceeds the limit 256"),
    ({"logprobs": 21}, "logprobs=21 must be in"),
    ({"stop_token_ids": [V]}, f"stop_token_ids: token id {V} is outside"),
    ({"top_k": V + 1}, f"top_k={V + 1} exceeds the vocabulary size {V}"),
])
def test_validation_names_value_and_limit(kwargs, msg):
    with pytest.raises(SamplingError, match=msg.replace("[", r"\[")):
        SamplingParams(**kwargs).validate(V)
