"""A request's state on rank 0: tokens, KV blocks, progress. Plain Python, no torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tpserve.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """`token_ids` = prompt + output. `num_computed_tokens` counts tokens whose K/V are in the
    cache; `num_cached_tokens` counts prompt tokens found in the prefix cache at admission."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Blocks of block_table already hashed into the prefix cache (a prefix of the table).
    num_hashed_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
