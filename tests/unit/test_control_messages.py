"""The control messages between ranks: typed and checked, never pickled. Round trips of any plan
(hypothesis), and malformed or hostile bytes refused with ControlMessageError before anything is
built from them."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpserve.engine.step import (MAGIC, MAX_ID, VERSION, ControlMessageError, Heartbeat, SeqWork, Shutdown, StepPlan,
                                 decode, encode)

IDS = st.integers(0, MAX_ID)


@st.composite
def plans(draw):
    seqs = []
    for _ in range(draw(st.integers(0, 5))):
        tokens = draw(st.lists(IDS, max_size=40))
        seqs.append(SeqWork(draw(IDS), tokens, draw(IDS), draw(st.none() | st.lists(IDS, max_size=8)),
                            draw(st.lists(IDS, max_size=4)), draw(st.none() | IDS), draw(st.booleans()),
                            draw(st.integers(0, max(1, len(tokens))))))
    return StepPlan(seqs, draw(st.lists(IDS, max_size=6)))


@settings(max_examples=200, deadline=None)
@given(msg=plans() | st.just(Heartbeat()) | st.text(max_size=50).map(Shutdown))
def test_every_message_round_trips(msg):
    assert decode(encode(msg)) == msg


def words(*values) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


@pytest.mark.parametrize("data,message", [
    (b"", "not 3 to"),
    (b"\x00" * 13, "whole 8-byte words"),
    (words(1, 2, 3), "wrong magic number"),
    (words(MAGIC, 99, 2), "version 99; this rank speaks 1"),
    (words(MAGIC, VERSION, 7), "the kind = 7 is outside"),
    (words(MAGIC, VERSION, 1, 0, 1, 5), "the message ends before sequence 5's computed tokens"),
    (words(MAGIC, VERSION, 1, 2**40), "the length of the finished sequence ids = 1099511627776 is outside"),
    (words(MAGIC, VERSION, 1, 1, -3, 0), "the finished sequence ids holds -3"),
    (words(MAGIC, VERSION, 1, 0, 1, 0, 0, 2, 5, -1, -1, 0, -1, 1, 1), "sequence 0's token ids holds -1"),
    (words(MAGIC, VERSION, 1, 0, 1, 0, 0, 1, 5, -1, 0, -1, 2, 1), "sequence 0's sample flag = 2"),
    (words(MAGIC, VERSION, 2, 0), "1 words follow the end of the message"),
    (words(MAGIC, VERSION, 3, 1, 300), "the shutdown reason holds 300"),
    (words(MAGIC, VERSION, 3, 2, 0xC3, 0x28), "the shutdown reason is not UTF-8"),
])
def test_malformed_messages_are_refused(data, message):
    with pytest.raises(ControlMessageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(data)


class _Boom:
    def __reduce__(self):  # what unpickling would run
        return (exec, ("import pathlib; pathlib.Path('/tmp/tpserve_pwned').write_text('x')",))


def test_a_pickle_is_refused_and_never_run(tmp_path):
    data = pickle.dumps(_Boom())
    data += b"\x00" * (-len(data) % 8)
    with pytest.raises(ControlMessageError, match="wrong magic number"):
        decode(data)
    import os
    assert not os.path.exists("/tmp/tpserve_pwned")
