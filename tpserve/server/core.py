"""The protocol-neutral serving core: everything a front-end adapter calls.

An adapter (tpserve.v1, OIP v2, HTTP next) only translates: its protocol's request into a prompt
and SamplingParams, the RequestOutputs this core yields into its protocol's messages, and a
RequestError's `kind` into its protocol's status. Validation, submission, cancellation and error
typing live here once. Runs on the front end's event loop; it reaches the engine only through the
door (EngineLoop) and the request factory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams
from tpserve.errors import InvalidRequest, NotFound, Overloaded, RequestError, Unavailable, Unsupported
from tpserve.route.router import AUTO, SMALL, TARGET
from tpserve.server.engine_loop import RequestHandle
from tpserve.server.state import ModelInfo, ServerInfo, ServerState


class Submission:
    """A queued request: its outputs, in order, until it finishes. Raises a RequestError if the
    engine refuses it or the group fails on the way. If the caller stops iterating early (a
    cancel, a deadline, a disconnect) or calls `abort`, the request is aborted on every rank and
    its KV blocks freed."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], handle: RequestHandle, door) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._handle = handle
        self._door = door
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._handle.queue.get()
                if isinstance(item, RequestError):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._door.abort(self.request_id)


class ServingCore:
    def __init__(self, state: ServerState, metrics=None) -> None:
        """metrics: a tpserve.metrics.ServerMetrics fed with every finished request, or None."""
        self.state = state
        self.metrics = metrics

    @property
    def served_model_name(self) -> str:
        return self.state.served_model_name

    def ready(self) -> bool:
        try:
            self.state.require_serving()
        except Unavailable:
            return False
        return True

    @property
    def model_names(self) -> list[str]:
        """The served names: the target's, and with a small model its name and `auto` (which a
        request may always give: without a small model it means the target)."""
        small = self.state.small_model_name
        return [self.served_model_name, small, AUTO] if small else [self.served_model_name]

    def resolve_model(self, name: str | None) -> str:
        """A requested model name -> TARGET, SMALL or AUTO (empty or None: the target); NotFound
        naming the served names otherwise."""
        if not name:
            return TARGET
        self.check_model(name)
        return AUTO if name == AUTO else SMALL if name == self.state.small_model_name else TARGET

    def check_model(self, name: str) -> None:
        """NotFound unless `name` is one of the served names."""
        if name not in self.model_names and name != AUTO:
            raise NotFound(f"model {name!r} is not served here; the served models are "
                           f"{', '.join(repr(n) for n in self.model_names)}")

    def model_name(self, model: str) -> str:
        """The name of the model that served a request (RequestOutput.model)."""
        return self.state.small_model_name if model == SMALL else self.served_model_name

    def submit(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
               params: SamplingParams | None = None, admitted: bool = False, model: str = TARGET) -> Submission:
        """Validate and queue a request now (raising a RequestError before anything is sent, so a
        protocol can still answer with a status); its outputs come from the Submission. admitted:
        part of a request that already passed the load checks (another sample of its prompt).
        model: TARGET, SMALL or AUTO, from `resolve_model`."""
        door = self.state.require_serving()
        seq = self.state.requests.make(request_id, prompt, prompt_token_ids, params, model)
        on_finished = self.metrics.observe_finished if self.metrics is not None else None
        handle = RequestHandle(asyncio.get_running_loop(), on_finished)
        try:
            door.submit(seq, handle, admitted)
        except Overloaded as e:
            if self.metrics is not None:
                self.metrics.observe_rejected(e.reason)
            raise
        return Submission(request_id, seq.prompt_token_ids, handle, door)

    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None, model: str = TARGET) -> AsyncIterator[RequestOutput]:
        """Validate, submit, and yield the request's outputs until it finishes (see Submission)."""
        async for out in self.submit(request_id, prompt, prompt_token_ids, params, model=model).outputs():
            yield out

    def abort(self, request_id: str) -> bool:
        """Abort a running request; False when the id is unknown or already finished."""
        door = self.state.door
        return bool(door is not None and door.abort(request_id))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[str]]:
        tok = self._tokenizer()
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        return ids, tok.convert_ids_to_tokens(ids)

    def detokenize(self, token_ids: list[int]) -> str:
        tok = self._tokenizer()
        vocab = self.model_info().vocab_size
        bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise InvalidRequest(f"token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return tok.decode(token_ids, skip_special_tokens=True)

    def _tokenizer(self):
        if self.state.tokenizer is None:
            raise Unsupported("the served model has no tokenizer")
        return self.state.tokenizer

    def model_info(self) -> ModelInfo:
        if self.state.model_info is None:
            raise Unavailable(self.state.unavailable_reason())
        return self.state.model_info

    def server_info(self) -> ServerInfo:
        return self.state.server_info()
