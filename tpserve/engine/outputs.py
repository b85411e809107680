"""What the engine reports: each step's output per request, and its statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from tpserve.engine.sampler import TokenLogprobs
from tpserve.engine.sequence import RequestTimes
from tpserve.engine.spec_decode.state import SpecStats


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens and the new text only (a delta). The
    last output of a request has `finished` set, its lifecycle `times` and, with speculative
    decoding, its `speculation` counts."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    time_to_first_token: float | None = None
    times: RequestTimes | None = None
    speculation: SpecStats | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, when the prompt has been scored
    model: str = "target"  # the model that served the request: "target" or "small" (tpserve.route)
    route: RouteOutcome | None = None  # an `auto` request's routing, on its last output
    error: str | None = None  # why the engine stopped it (finish_reason "error"), on its last output


@dataclass(frozen=True)
class RouteOutcome:
    """How the router served an `auto` request."""

    policy: str
    score: float | None
    threshold: float | None
    handed_over: bool  # started on the small model, finished on the target


@dataclass(frozen=True)
class RouteStats:
    """Routing totals since start-up."""

    policy: str | None
    threshold: float | None
    small_fraction: float | None  # the fraction in force (below the asked one under --route-min-quality)
    num_auto: int
    num_to_small: int
    num_to_target: int
    num_handovers: int
    small_requests: int  # requests the small model finished, whatever asked for it
    small_generation_tokens: int
    audit: dict  # tpserve.route.audit.AuditTotals.summary()


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, read in O(1): every count is kept as it changes."""

    num_waiting: int
    num_running: int
    kv_blocks_free: int
    kv_blocks_cached: int
    kv_blocks_in_use: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_steps: int
    speculation: SpecStats | None = None
    # Running totals since start-up (Prometheus counters are read from these).
    num_prompt_tokens: int = 0  # of requests whose prompt has been computed
    num_generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # ... and found there
    spec_num_drafts: int = 0  # sequence-steps that verified proposals
    spec_accepted_by_position: tuple[int, ...] = ()
    last_step_num_tokens: int = 0  # tokens the latest step computed
    kv_blocks_in_use_peak: int = 0  # the most KV blocks in use at once since start
    routing: RouteStats | None = None  # with a small model
