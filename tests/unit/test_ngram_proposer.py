"""Prompt lookup: the incremental index proposes exactly what the scanning rule does, as a
sequence grows step by step, and lives on the sequence: the proposer keeps nothing per sequence."""

import random

from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.sequence import Sequence
from tpserve.engine.spec_decode.proposers import NgramProposer


def test_rule_on_a_hand_built_history():
    p = NgramProposer(max_ngram=3)
    # "7 8 9" occurred before, followed by "1 2": the longest suffix match wins.
    assert p.lookup([7, 8, 9, 1, 2, 5, 8, 9, 4, 7, 8, 9], 3) == [1, 2, 5]
    assert p.lookup([1, 2, 3], 2) == []  # no earlier occurrence
    assert p.lookup([5, 6, 5, 6, 5], 4) == [6, 5]  # the most recent earlier "5 6 5" is followed by "6 5"


def test_incremental_index_equals_the_scanning_rule():
    rng = random.Random(0)
    p = NgramProposer(max_ngram=4)
    config = dict(vars(p))
    for seq_id in range(20):
        seq = Sequence(seq_id, str(seq_id), [rng.randrange(6) for _ in range(rng.randrange(1, 12))], SamplingParams())
        for _ in range(60):
            k = rng.randrange(1, 6)
            got = p.propose([seq], [k])[0]
            assert got.tokens == p.lookup(seq.token_ids, k), (seq.token_ids, k)
            assert got.requested == k
            # Grow by one token, or by several (accepted proposals arrive together).
            seq.token_ids.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))
        assert seq.spec.ngram.num_indexed > 0  # the index is the sequence's own
    assert vars(p) == config  # nothing per sequence stayed in the proposer
