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
from tpserve.errors import NotFound, RequestError, Unavailable, Unsupported
from tpserve.server.engine_loop import RequestHandle
from tpserve.server.state import ModelInfo, ServerInfo, ServerState


class ServingCore:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def served_model_name(self) -> str:
        return self.state.served_model_name

    def ready(self) -> bool:
        try:
            self.state.require_serving()
        except Unavailable:
            return False
        return True

    def check_model(self, name: str) -> None:
        """NotFound unless `name` is the served model."""
        if name != self.served_model_name:
            raise NotFound(f"model {name!r} is not served here; the served model is {self.served_model_name!r}")

    async def generate(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Validate, submit, and yield the request's outputs until it finishes. Raises a
        RequestError (before the first output, or Unavailable if the group fails on the way). If
        the caller stops iterating early (a cancel, a deadline) the request is aborted and its KV
        blocks freed."""
        door = self.state.require_serving()
        seq = self.state.requests.make(request_id, prompt, prompt_token_ids, params)
        handle = RequestHandle(asyncio.get_running_loop())
        door.submit(seq, handle)
        finished = False
        try:
            while not finished:
                item = await handle.queue.get()
                if isinstance(item, RequestError):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                door.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """Abort a running request; False when the id is unknown or already finished."""
        door = self.state.door
        return bool(door is not None and door.abort(request_id))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[str]]:
        tok = self.state.tokenizer
        if tok is None:
            raise Unsupported("the served model has no tokenizer")
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        return ids, tok.convert_ids_to_tokens(ids)

    def model_info(self) -> ModelInfo:
        if self.state.model_info is None:
            raise Unavailable(self.state.unavailable_reason())
        return self.state.model_info

    def server_info(self) -> ServerInfo:
        return self.state.server_info()
