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
