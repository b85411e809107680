"""A request's state on rank 0, in one place: its tokens, KV blocks and progress, what the worker
ranks hold of its block table, its detokeniser, speculation's state of it,
and its lifecycle timestamps. When the sequence goes, all of it goes. Plain Python: the detokeniser
and speculation state are held, not imported."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpserve.engine.sampling_params import SamplingParams
from tpserve.route.router import SMALL, TARGET  # Sequence.model: the model that computes its K/V and tokens

if TYPE_CHECKING:
    from tpserve.engine.detokenizer import IncrementalDetokenizer
    from tpserve.engine.spec_decode.state import SpecState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestTimes:
    """Lifecycle timestamps of one request (time.monotonic seconds), the raw material of metrics."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token, in order
    preemptions: list[float] = field(default_factory=list)
    finished: float | None = None

    @staticmethod
    def _between(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled (waiting in the queue)."""
        return self._between(self.arrival, self.first_scheduled)

    @property
    def time_to_first_token(self) -> float | None:
        return self._between(self.arrival, self.first_token)

    @property
    def prefill_time(self) -> float | None:
        """First scheduled to first token (prompt computation, chunks included)."""
        return self._between(self.first_scheduled, self.first_token)

    @property
    def decode_time(self) -> float | None:
        """First token to finish."""
        return self._between(self.first_token, self.finished)

    @property
    def e2e_latency(self) -> float | None:
        return self._between(self.arrival, self.finished)

    @property
    def inter_token_times(self) -> list[float]:
        """Gaps between consecutive output tokens (0 within a step that emitted several)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass(eq=False, slots=True)
class Sequence:
    """`token_ids` = prompt + output. `num_computed_tokens` counts tokens whose K/V are in the
    cache; `num_cached_tokens` counts prompt tokens found in the prefix cache at admission.
    `seq_id` is assigned by the engine when the sequence is added (-1 before)."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    times: RequestTimes = field(default_factory=RequestTimes)
    status: SeqStatus = SeqStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Blocks of block_table already hashed into the prefix cache (a prefix of the table).
    num_hashed_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)
    # Length of the block table the worker ranks hold; None when they hold none.
    num_sent_blocks: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error": what went wrong (non-finite logits)
    num_preemptions: int = 0
    # Output appended since the engine last emitted this sequence's output.
    num_emitted_tokens: int = 0
    unsent_logprobs: list = field(default_factory=list)
    # With params.prompt_logprobs: entry i scores prompt token i + 1, filled chunk by chunk in prefill.
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False
    detokenizer: IncrementalDetokenizer | None = None
    spec: SpecState | None = None  # speculative decoding's state of this sequence
    model: str = TARGET  # TARGET, or SMALL: served by the small model on rank 0 (tpserve.route)
    cache_model: str = TARGET  # whose prefix-cache chains its blocks join (its model when admitted)
    route: Any = None  # tpserve.route.RouteState: the router's state of an `auto` request, or an audit's
    background: bool = False  # internal work (a routing audit): admitted only when nothing waits, never emitted

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = []

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
    def is_decoding(self) -> bool:
        """Past its prompt: each step that reaches its last token samples its next output token,
        and speculation may run on it. The one definition of decoding."""
        return self.num_output_tokens > 0

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
