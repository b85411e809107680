"""Typed control messages that rank 0 sends to every rank over the cpu group each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqWork:
    """One sequence's share of a step.

    token_ids are the tokens whose K/V this step computes; the first sits at position
    `num_computed_tokens`. `block_table` lists the sequence's KV blocks (global to every rank:
    each rank stores its own heads of the same blocks). `sample` asks for logits of the last token.
    """

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    sample: bool = True


@dataclass
class StepPlan:
    seqs: list[SeqWork] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class Shutdown:
    """Tells worker ranks to leave their loop cleanly."""

    reason: str = "shutdown"
