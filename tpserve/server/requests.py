"""Turning a request into a sequence the engine can run, on any thread.

Every front end (tpserve.v1, OIP v2, offline generation, and whatever comes next) hands its
request here; nothing here calls into the engine object, so a front-end thread can validate and
reject while the engine thread keeps stepping. What it needs of the engine, the limits, is copied
once at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpserve.engine.detokenizer import IncrementalDetokenizer
from tpserve.engine.sampling_params import SamplingError, SamplingParams
from tpserve.engine.scheduler import RequestRejected, check_feasible
from tpserve.engine.sequence import SMALL, TARGET, Sequence
from tpserve.route.router import AUTO, RouteState


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against."""

    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int


class RequestFactory:
    def __init__(self, limits: RequestLimits, tokenizer=None) -> None:
        self.limits = limits
        self.tokenizer = tokenizer

    @classmethod
    def for_engine(cls, engine) -> RequestFactory:
        """Copy the engine's limits (call before the engine loop starts)."""
        bm = engine.block_manager
        limits = RequestLimits(engine.vocab_size, engine.scheduler.config.max_model_len, bm.num_blocks, bm.block_size)
        return cls(limits, engine.tokenizer)

    def make(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
             params: SamplingParams | None = None, model: str = TARGET) -> Sequence:
        """A validated sequence, with its detokeniser when the model has a tokenizer. Raises
        RequestRejected / SamplingError (both InvalidRequest) naming the value and the limit.
        model: TARGET, SMALL, or "auto" (the engine's router chooses)."""
        params = params or SamplingParams()
        ids = self.prompt_ids(prompt, prompt_token_ids)
        params.validate(self.limits.vocab_size)
        if params.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer; this model directory has none")
        seq = Sequence(-1, request_id, ids, params)
        if model == AUTO:
            seq.route = RouteState(AUTO)
        elif model in (TARGET, SMALL):
            seq.model = model
        else:
            raise ValueError(f"model must be {TARGET!r}, {SMALL!r} or 'auto', not {model!r}")
        lim = self.limits
        check_feasible(seq, lim.max_model_len, lim.num_kv_blocks, lim.block_size)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        return seq

    def prompt_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestRejected("give exactly one of a text prompt and prompt token ids")
        if prompt is not None:
            if not prompt:
                raise RequestRejected("prompt is empty")
            if self.tokenizer is None:
                raise RequestRejected("text prompt given but the model has no tokenizer; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
            vocab = self.limits.vocab_size
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise RequestRejected("prompt is empty")
        return ids
