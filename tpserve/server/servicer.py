"""tpserve.v1.Generation servicer (grpc.aio), running on the front-end thread's event loop."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from tpserve.engine.engine import RequestOutput
from tpserve.engine.sampling_params import SamplingError
from tpserve.engine.scheduler import RequestRejected
from tpserve.server.convert import chunk_response, complete_response, sampling_from_proto
from tpserve.server.engine_loop import Failure, RequestHandle, ServerBusy, ServerUnavailable
from tpserve.server.state import ServerState
from tpserve.v1 import generation_pb2 as pb
from tpserve.v1 import generation_pb2_grpc as pb_grpc


async def run_request(state: ServerState, context, request_id: str, text, token_ids, params):
    """Validate, submit and yield RequestOutputs until the request finishes. Aborts the request
    in the engine if the caller goes away (cancel, deadline) before that."""
    loop = state.require_serving()
    if loop is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, state.unavailable_reason())
    try:
        seq = loop.engine.make_sequence(request_id, text, token_ids, params)
    except (RequestRejected, SamplingError) as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    handle = RequestHandle(asyncio.get_running_loop())
    try:
        loop.submit(seq, handle)
    except ServerBusy as e:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except ServerUnavailable as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    finished = False
    try:
        while not finished:
            item = await handle.queue.get()
            if isinstance(item, Failure):
                finished = True
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the server failed: {item.message}")
            if isinstance(item, Exception):
                finished = True
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
            finished = item.finished
            yield item
    finally:
        if not finished:
            loop.abort(request_id)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def Generate(self, request: pb.GenerateRequest, context):
        request_id = request.request_id or uuid.uuid4().hex
        which = request.WhichOneof("input")
        text = request.text if which == "text" else None
        ids = list(request.token_ids.ids) if which == "token_ids" else None
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request has neither text nor token_ids")
        params = sampling_from_proto(request.sampling)
        whole = RequestOutput(request_id)
        async for out in run_request(self.state, context, request_id, text, ids, params):
            if request.stream:
                if out.new_token_ids or out.text:
                    yield chunk_response(out)
                if out.finished:
                    yield complete_response(out)
            else:
                whole.new_token_ids += out.new_token_ids
                whole.text += out.text
                whole.logprobs += out.logprobs
                if out.finished:
                    yield complete_response(out, whole)

    async def Abort(self, request: pb.AbortRequest, context):
        loop = self.state.engine_loop
        return pb.AbortResponse(aborted=bool(loop and loop.abort(request.request_id)))

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        tok = self.state.tokenizer
        if tok is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the served model has no tokenizer")
        ids = tok.encode(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, tokens=tok.convert_ids_to_tokens(ids))

    async def GetModelInfo(self, request, context):
        if self.state.model_info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.state.unavailable_reason())
        return self.state.model_info

    async def GetServerInfo(self, request, context):
        return self.state.server_info()
