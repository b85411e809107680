"""Typed control messages that rank 0 sends to every rank over the cpu group each step.

Block tables travel as diffs: a sequence new to the workers (or resumed after preemption) carries
its whole table once; afterwards only appended block ids, and a truncation length after a
speculative rollback. `finished` lists sequences whose tables the workers should drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqWork:
    """One sequence's share of a step.

    token_ids are the tokens whose K/V this step computes; the first sits at position
    `num_computed_tokens`. `sample` asks for logits at the last `num_logits` of those positions
    (1 normally; k + 1 when verifying k speculative tokens).
    """

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int] | None = None  # full table: first time the workers see this sequence
    new_blocks: list[int] = field(default_factory=list)  # appended to the workers' copy otherwise
    num_blocks_kept: int | None = None  # truncate the workers' copy to this length first
    sample: bool = True
    num_logits: int = 1


@dataclass
class StepPlan:
    seqs: list[SeqWork] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class Heartbeat:
    """Sent while rank 0 is idle (every `heartbeat_s` without a step), and answered by a barrier
    of every rank: each side's stall watchdog (tpserve.distributed.watchdog) hears from the others
    even when no request runs."""


@dataclass
class Shutdown:
    """Tells worker ranks to leave their loop cleanly."""

    reason: str = "shutdown"


# --- the wire format ------------------------------------------------------------------------------
# Control messages cross the network between ranks, so they are encoded as flat little-endian int64
# words that the receiver checks field by field, never as pickles (unpickling bytes from the
# network runs whatever code they name). A message is [MAGIC, VERSION, kind, ...]:
#   StepPlan:  n_finished, finished..., n_seqs, then per sequence
#              seq_id, num_computed_tokens, n_tokens, token_ids..., n_table (-1: none), table...,
#              n_new, new_blocks..., num_blocks_kept (-1: none), sample (0/1), num_logits
#   Heartbeat: nothing more
#   Shutdown:  n_bytes, the reason's UTF-8 bytes (one per word)
MAGIC = 0x7470_7365_7276_6531  # "tpservE1"
VERSION = 1
_PLAN, _HEARTBEAT, _SHUTDOWN = 1, 2, 3
MAX_ID = 2**31 - 1  # token ids, block ids, positions and counts all fit an int32
MAX_SEQ_ID = 2**63 - 1  # sequence ids count up for the server's lifetime
MAX_MESSAGE_BYTES = 64 << 20  # far past any real plan (a 16k-token chunk is 128 KiB), short of harm
MAX_MESSAGE_WORDS = MAX_MESSAGE_BYTES // 8


class ControlMessageError(ValueError):
    """Bytes from rank 0 that are not a well-formed control message: the group cannot go on."""


def encode(msg) -> bytes:
    import numpy as np

    if isinstance(msg, StepPlan):
        words = [MAGIC, VERSION, _PLAN, len(msg.finished), *msg.finished, len(msg.seqs)]
        for w in msg.seqs:
            words += [w.seq_id, w.num_computed_tokens, len(w.token_ids), *w.token_ids]
            words += [-1] if w.block_table is None else [len(w.block_table), *w.block_table]
            words += [len(w.new_blocks), *w.new_blocks]
            words += [-1 if w.num_blocks_kept is None else w.num_blocks_kept, int(bool(w.sample)), w.num_logits]
    elif isinstance(msg, Heartbeat):
        words = [MAGIC, VERSION, _HEARTBEAT]
    elif isinstance(msg, Shutdown):
        reason = msg.reason.encode("utf-8")
        words = [MAGIC, VERSION, _SHUTDOWN, len(reason), *reason]
    else:
        raise TypeError(f"not a control message: {type(msg).__name__}")
    return np.asarray(words, dtype="<i8").tobytes()


class _Reader:
    def __init__(self, words: list[int]) -> None:
        self.words, self.at = words, 0

    def int(self, what: str, low: int = 0, high: int = MAX_ID) -> int:
        if self.at >= len(self.words):
            raise ControlMessageError(f"the message ends before {what} (word {self.at})")
        value = self.words[self.at]
        self.at += 1
        if not low <= value <= high:
            raise ControlMessageError(f"{what} = {value} is outside [{low}, {high}] (word {self.at - 1})")
        return value

    def ints(self, what: str, low: int = 0, high: int = MAX_ID) -> list[int]:
        n = self.int(f"the length of {what}", 0, len(self.words) - self.at - 1 if self.at < len(self.words) else 0)
        values = self.words[self.at : self.at + n]
        self.at += n
        bad = next((v for v in values if not low <= v <= high), None)
        if bad is not None:
            raise ControlMessageError(f"{what} holds {bad}, outside [{low}, {high}]")
        return values


def decode(data: bytes):
    """The message `data` encodes, or ControlMessageError naming what is wrong with it."""
    import numpy as np

    if len(data) % 8 or not 24 <= len(data) <= 8 * MAX_MESSAGE_WORDS:
        raise ControlMessageError(f"a control message of {len(data)} bytes is not 3 to {MAX_MESSAGE_WORDS} "
                                  f"whole 8-byte words")
    r = _Reader(np.frombuffer(data, dtype="<i8").tolist())
    if r.int("the magic number", -(2**63), 2**63 - 1) != MAGIC:
        raise ControlMessageError("not a tpserve control message (wrong magic number)")
    version = r.int("the version", 0, 2**31)
    if version != VERSION:
        raise ControlMessageError(f"control message version {version}; this rank speaks {VERSION}")
    kind = r.int("the kind", _PLAN, _SHUTDOWN)
    if kind == _HEARTBEAT:
        msg = Heartbeat()
    elif kind == _SHUTDOWN:
        try:
            msg = Shutdown(bytes(r.ints("the shutdown reason", 0, 255)).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ControlMessageError(f"the shutdown reason is not UTF-8: {e}") from None
    else:
        finished = r.ints("the finished sequence ids", 0, MAX_SEQ_ID)
        seqs = []
        for i in range(r.int("the number of sequences")):
            seq_id = r.int(f"sequence {i}'s id", 0, MAX_SEQ_ID)
            start = r.int(f"sequence {seq_id}'s computed tokens")
            tokens = r.ints(f"sequence {seq_id}'s token ids")
            n_table = r.int(f"sequence {seq_id}'s block table length", -1)
            table = None
            if n_table >= 0:
                r.at -= 1
                table = r.ints(f"sequence {seq_id}'s block table")
            new_blocks = r.ints(f"sequence {seq_id}'s new blocks")
            kept = r.int(f"sequence {seq_id}'s kept blocks", -1)
            sample = r.int(f"sequence {seq_id}'s sample flag", 0, 1)
            num_logits = r.int(f"sequence {seq_id}'s logit rows", 0, max(1, len(tokens)))
            seqs.append(SeqWork(seq_id, tokens, start, table, new_blocks, None if kept < 0 else kept, bool(sample),
                                num_logits))
        msg = StepPlan(seqs, finished)
    if r.at != len(r.words):
        raise ControlMessageError(f"{len(r.words) - r.at} words follow the end of the message")
    return msg
