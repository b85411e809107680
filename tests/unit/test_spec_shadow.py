"""Shadow verification of n-gram proposals: replaying the emitted tokens records exactly the
verifications that real speculation with the same proposer and k makes on the same text."""

import pytest

from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.sequence import Sequence
from tpserve.engine.spec_decode.proposers import NgramProposer
from tpserve.engine.spec_decode.rejection import verify_greedy
from tpserve.engine.spec_decode.shadow import ShadowVerifier


def target(context: list[int]) -> int:
    """A deterministic stand-in for a greedy target over 5 tokens: it repeats stretches of its
    own recent output (so proposals are often right) and drifts every 13 positions (so they are
    often wrong)."""
    n = len(context)
    if n % 13 < 7 and n > 9:
        return context[n - 9]
    return (context[-1] * 3 + context[-2] + n // 13) % 5


def one_hot_rows(context, proposals):
    """Target 'logits' at every verified position: one-hot at the target's token."""
    import torch

    rows = torch.zeros(len(proposals) + 1, 5)
    for i in range(len(proposals) + 1):
        rows[i, target(context + proposals[:i])] = 1.0
    return rows


@pytest.mark.parametrize("k", [1, 3, 5])
def test_shadow_records_what_speculation_records(k):
    prompt = [1, 4, 2, 0, 3, 1, 4]
    length = 400
    # Real speculation: propose, verify greedily, append the emitted tokens, repeat.
    real, ngram = [], NgramProposer(max_ngram=3)
    speculating = Sequence(1, "s", list(prompt), SamplingParams())
    tokens = speculating.token_ids
    while len(tokens) < length:
        proposal = ngram.indexed_lookup(speculating, k)
        emitted = verify_greedy(one_hot_rows(tokens, proposal), proposal)
        real.append((len(emitted) - 1, k))
        tokens += emitted
    # Shadow: the same target one token per step, never speculating.
    shadow = []
    seq = Sequence(0, "r", list(prompt), SamplingParams())
    verifier = ShadowVerifier(NgramProposer(max_ngram=3).indexed_lookup, k,
                              lambda seq, acc, req: shadow.append((acc, req)))
    while seq.num_tokens < length:
        seq.token_ids.append(target(seq.token_ids))
        verifier.observe(seq, 1)
    assert seq.token_ids == tokens[:length]  # greedy speculation is lossless
    assert len(shadow) > 50 and any(a == k for a, _ in shadow) and any(a < k for a, _ in shadow)
    assert shadow == real[: len(shadow)]
    assert len(real) - len(shadow) <= 1  # only the verification still open at the end differs


def test_forget_drops_a_pending_proposal():
    seen = []
    v = ShadowVerifier(NgramProposer().indexed_lookup, 4, lambda *a: seen.append(a))
    seq = Sequence(7, "r", [1, 2, 3, 1, 2], SamplingParams())
    seq.token_ids.append(3)
    v.observe(seq, 1)  # the lookup of "1 2" proposes "3 1 2": its first token matched
    assert seq.spec.shadow is not None and not seen
    v.forget(seq)
    assert seq.spec.shadow is None and v.num_tracked == 0


def test_follows_at_most_max_tracked_sequences_and_frees_a_place_on_forget():
    seen = []
    v = ShadowVerifier(NgramProposer().indexed_lookup, 2, lambda seq, *_: seen.append(seq.seq_id), max_tracked=2)
    seqs = [Sequence(i, str(i), [5, 6, 7], SamplingParams()) for i in range(4)]
    for seq in seqs:
        seq.token_ids.append(1)  # nothing to look up: each followed sequence records (0, 2) at once
        v.observe(seq, 1)
    assert seen == [0, 1]
    v.forget(seqs[0])
    seqs[3].token_ids.append(1)
    v.observe(seqs[3], 1)
    assert seen == [0, 1, 3]
