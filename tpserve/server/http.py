"""The OpenAI-compatible HTTP front door (FastAPI on uvicorn), an adapter on the serving core that
runs on the front end's event loop beside gRPC.

Every request is validated and queued before its response starts, so a bad streaming request
gets its real status (400, 404, 429 with Retry-After, 503) in OpenAI's error envelope rather than
a 200 with an error event. A client that disconnects aborts its request on every rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tpserve.errors import InvalidRequest, RequestError, Unsupported
from tpserve.server.security import UNAUTHENTICATED_MESSAGE, Security
from tpserve.server import openai_responses as fmt
from tpserve.server.choices import ChoiceSet
from tpserve.server.core import ServingCore
from tpserve.server.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                            TokenizeRequest)

VERSION = "0.1.0"


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   retry_after_s: int = 1) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
    return JSONResponse(fmt.error_body(status, message, code, param), status_code=status, headers=headers)


def build_app(core: ServingCore, chat_template: str | None = None, security: Security | None = None) -> FastAPI:
    app = FastAPI(title="tpserve", version=VERSION)
    security = security or Security()

    if security.api_keys:
        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if security.http_needs_key(request.url.path) and \
                    not security.authorized(request.headers.get("authorization")):
                security.refused("http")
                response = error_response(401, UNAUTHENTICATED_MESSAGE, "unauthenticated")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            return await call_next(request)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return error_response(fmt.request_error_status(e), str(e), e.kind,
                              retry_after_s=getattr(e, "retry_after_s", 1))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        field = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        value = f" (got {first['input']!r})" if "input" in first and first.get("type") != "missing" else ""
        message = f"{field}: {first.get('msg')}{value}" if field else first.get("msg", "invalid request")
        return error_response(400, message, "invalid_argument", field)

    @app.get("/health")
    async def health():
        if core.ready():
            return {"status": "ok"}
        return error_response(503, core.state.unavailable_reason(), "unavailable")

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models():
        info = core.model_info()
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "tpserve",
                                            "created": int(core.state.started_at), "max_model_len": info.max_model_len}
                                           for name in core.model_names]}

    @app.get("/metrics")
    async def metrics():
        if core.metrics is None:
            return error_response(404, "metrics are off (the server was started with --no-metrics)", "not_found")
        return Response(core.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(core, body.model)
        ids, _ = core.tokenize(body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": core.model_info().max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(core, body.model)
        return {"prompt": core.detokenize(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        choices = ChoiceSet(core, f"cmpl-{uuid.uuid4().hex}", body.prompts(), body.params(), body.n,
                            core.resolve_model(body.model))
        reply = _CompletionReply(core, body, choices)
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await _until_disconnect(request, reply.whole())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        model = core.resolve_model(body.model)
        ids = render_chat(core, body, chat_template)
        # Without max_tokens a reply may run to the end of the context, or of what the KV cache holds.
        lim = core.state.requests.limits
        room = min(lim.max_model_len, lim.num_kv_blocks * lim.block_size) - len(ids)
        params = body.params(default_max_tokens=max(1, room))
        choices = ChoiceSet(core, f"chatcmpl-{uuid.uuid4().hex}", [(None, ids)], params, body.n, model)
        reply = _ChatReply(core, body, choices)
        if body.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await _until_disconnect(request, reply.whole())

    return app


def _check_model(core: ServingCore, name: str | None) -> None:
    if name is not None:
        core.check_model(name)


def render_chat(core: ServingCore, body: ChatCompletionRequest, chat_template: str | None) -> list[int]:
    tokenizer = core.state.tokenizer
    if tokenizer is None:
        raise Unsupported("the served model has no tokenizer, so it cannot render chat messages")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("the served model has no chat template; start the server with --chat-template FILE "
                             "(a Jinja chat template), or give the model a chat_template in tokenizer_config.json "
                             "or a chat_template.jinja file")
    messages = [m.for_template() for m in body.messages]
    try:
        return list(tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                                  add_generation_prompt=body.add_generation_prompt,
                                                  return_dict=False))
    except Exception as e:  # a template error is the request's or the template's, never the server's
        raise InvalidRequest(f"the chat template could not render these messages: {type(e).__name__}: {e}") from None


async def _until_disconnect(request: Request, work):
    """Run `work` unless the client disconnects first; then cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return Response(status_code=499)  # the client is gone: nobody reads this


class _Reply:
    """What completions and chat share: the choices' state and the stream's framing."""

    object_name = ""

    def __init__(self, core: ServingCore, body, choices: ChoiceSet) -> None:
        self.core = core
        self.body = body
        self.choice_set = choices
        self.tokenizer = core.state.tokenizer
        self.id = choices.request_id
        self.created = int(time.time())
        n = body.n
        self.choices = [fmt.Choice(i * n + j, ids, text) for i, ((text, _), ids) in
                        enumerate(zip(choices.prompts, choices.prompt_token_ids)) for j in range(n)]
        self.logprobs: list[list] = [[] for _ in self.choices]

    def _take(self, index: int, out):
        choice = self.choices[index]
        before = choice.add(out)
        self.logprobs[index] += out.logprobs
        if choice.prompt_logprobs is None and out.prompt_logprobs is None and index % self.body.n:
            choice.prompt_logprobs = self.choices[index - index % self.body.n].prompt_logprobs
        return choice, before

    def _usage(self) -> dict:
        prompts = sum(c.num_prompt_tokens for c in self.choices[:: self.body.n])
        return fmt.usage(prompts, sum(len(c.token_ids) for c in self.choices))

    def _chunk(self, choices: list[dict], model: str | None = None, **extra) -> str:
        return fmt.sse({"id": self.id, "object": self.object_name + ".chunk" if self.object_name == "chat.completion"
                        else self.object_name, "created": self.created,
                        "model": self.core.model_name(model) if model else self._model(),
                        "choices": choices, **extra})

    def _model(self) -> str:
        """The response's model: the name of the model that served the first choice (each choice
        of an `auto` request names its own with its `route`)."""
        return self.core.model_name(self.choices[0].model) if self.choices[0].model else self.body.model

    def _whole(self, choice: fmt.Choice) -> dict:
        body = self._whole_choice(choice)
        if choice.route is not None:
            body["route"] = fmt.route_info(self.core.model_name(choice.model), choice.route)
        return body

    async def whole(self) -> dict:
        async for index, out in self.choice_set.outputs():
            self._take(index, out)
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self._model(),
                "choices": [self._whole(c) for c in self.choices], "usage": self._usage()}

    async def stream(self):
        try:
            async for index, out in self.choice_set.outputs():
                choice, before = self._take(index, out)
                piece = self._delta(choice, before, out)
                if piece is not None:
                    if out.route is not None:
                        piece["route"] = fmt.route_info(self.core.model_name(out.model), out.route)
                    yield self._chunk([piece], out.model,
                                      **({"usage": self._usage()} if self.body.continuous_usage else {}))
        except RequestError as e:  # the group failed after the stream started
            status = fmt.request_error_status(e)
            yield fmt.sse(fmt.error_body(status, str(e), e.kind))
            return
        if self.body.include_usage:
            yield self._chunk([], usage=self._usage())
        yield fmt.sse("[DONE]")


class _CompletionReply(_Reply):
    object_name = "text_completion"

    def _logprobs(self, choice: fmt.Choice, token_ids: list[int], lps: list, num_before: int,
                  text_before: str, first: bool) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens_before = choice.token_ids[:num_before]
        echo = self.body.echo and first
        offset = (len(choice.echo_text(self.tokenizer)) if self.body.echo else 0) + len(text_before)
        out = fmt.completion_logprobs(self.tokenizer, token_ids, lps, choice.prompt_ids + tokens_before, offset)
        if echo and choice.prompt_logprobs is not None:
            prompt = fmt.completion_logprobs(self.tokenizer, choice.prompt_ids, choice.prompt_logprobs, [], 0)
            out = {key: prompt[key] + out[key] for key in out}
        return out

    def _whole_choice(self, choice: fmt.Choice) -> dict:
        text = (choice.echo_text(self.tokenizer) if self.body.echo else "") + choice.text
        logprobs = self._logprobs(choice, choice.token_ids, self.logprobs[choice.index], 0, "", True)
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    def _delta(self, choice: fmt.Choice, before: tuple[int, str], out) -> dict | None:
        num_before, text_before = before
        first = not num_before and not text_before
        text = (choice.echo_text(self.tokenizer) if self.body.echo and first else "") + out.text
        if not (text or out.new_token_ids or out.finished):
            return None
        logprobs = self._logprobs(choice, out.new_token_ids, out.logprobs, num_before, text_before, first)
        return {"index": choice.index, "text": text, "logprobs": logprobs,
                "finish_reason": out.finish_reason if out.finished else None}


class _ChatReply(_Reply):
    object_name = "chat.completion"

    def _logprobs(self, choice: fmt.Choice, token_ids: list[int], lps: list, num_before: int) -> dict | None:
        if not self.body.logprobs:
            return None
        return fmt.chat_logprobs(self.tokenizer, token_ids, lps, choice.prompt_ids + choice.token_ids[:num_before])

    def _whole_choice(self, choice: fmt.Choice) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self._logprobs(choice, choice.token_ids, self.logprobs[choice.index], 0),
                "finish_reason": choice.finish_reason}

    def _delta(self, choice: fmt.Choice, before: tuple[int, str], out) -> dict | None:
        num_before, text_before = before
        delta = {"content": out.text}
        if not num_before and not text_before:
            delta = {"role": "assistant", **delta}
        elif not (out.text or out.new_token_ids or out.finished):
            return None
        return {"index": choice.index, "delta": delta,
                "logprobs": self._logprobs(choice, out.new_token_ids, out.logprobs, num_before),
                "finish_reason": out.finish_reason if out.finished else None}


class HttpListener:
    """Serves the app with uvicorn on the front end's event loop (no threads or processes of its own)."""

    def __init__(self, core: ServingCore, host: str, port: int, chat_template: str | None = None,
                 security: Security | None = None) -> None:
        self.security = security or Security()
        self.app = build_app(core, chat_template, self.security)
        self.host = host
        self.port = port
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only when the
        # socket's proto says TCP, and without it a response written as headers then body waits for
        # the client's delayed ACK (40 ms on Linux; measured: every 400 took 44 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"could not bind the HTTP server to {self.host}:{self.port}: {e}") from None
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, **self.security.uvicorn_options())
        self.server = uvicorn.Server(config)
        self._task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return port

    async def set_phase(self, phase: str) -> None:
        """/health reads the phase from the server state on every call."""

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            self.server.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, grace_s + 5)
