"""From streamed deltas to whole outputs: the one accumulator every front end uses (offline
generation, and the non-streaming tpserve.v1 and OIP v2 calls). Stop-string hold-back happens where
stop strings are matched, in the engine's detokeniser, so a delta never carries half a stop string
and whatever is accumulated from deltas is already final."""

from __future__ import annotations

from dataclasses import dataclass, field

from tpserve.engine.outputs import RequestOutput, RouteOutcome
from tpserve.engine.sampler import TokenLogprobs
from tpserve.engine.sequence import RequestTimes
from tpserve.engine.spec_decode.state import SpecStats


@dataclass
class CompletedRequest:
    """A whole request's result."""

    request_id: str
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    time_to_first_token: float | None = None
    times: RequestTimes | None = None
    speculation: SpecStats | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    model: str = "target"  # the model that served it: "target" or "small"
    route: RouteOutcome | None = None  # an `auto` request's routing

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputAccumulator:
    """Adds up one request's RequestOutputs in order."""

    def __init__(self, request_id: str, prompt_token_ids: list[int] | None = None) -> None:
        self.result = CompletedRequest(request_id, list(prompt_token_ids or []))

    def add(self, out: RequestOutput) -> CompletedRequest:
        r = self.result
        r.token_ids += out.new_token_ids
        r.text += out.text
        r.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            r.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            r.finish_reason = out.finish_reason
            r.num_prompt_tokens = out.num_prompt_tokens
            r.num_cached_tokens = out.num_cached_tokens
            r.time_to_first_token = out.time_to_first_token
            r.times = out.times
            r.speculation = out.speculation
            r.model = out.model
            r.route = out.route
        return r
