"""tpserve.v1.Generation over grpc.aio: a thin adapter on the serving core."""

from __future__ import annotations

import uuid

from tpserve.errors import RequestError
from tpserve.server.convert import (
    abort_with,
    chunk_response,
    complete_response,
    model_info_to_proto,
    prompt_from_proto,
    sampling_from_proto,
    server_info_to_proto,
)
from tpserve.server.core import ServingCore
from tpserve.server.outputs import OutputAccumulator
from tpserve.v1 import generation_pb2 as pb
from tpserve.v1 import generation_pb2_grpc as pb_grpc


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def Generate(self, request: pb.GenerateRequest, context):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            prompt, token_ids = prompt_from_proto(request)
            model = self.core.resolve_model(request.model)
            whole = OutputAccumulator(request_id)
            async for out in self.core.generate(request_id, prompt, token_ids, sampling_from_proto(request.sampling),
                                                model=model):
                if request.stream:
                    if out.new_token_ids or out.text:
                        yield chunk_response(out)
                    if out.finished:
                        yield complete_response(out, model_name=self.core.model_name(out.model))
                elif whole.add(out).finished:
                    yield complete_response(out, whole.result, self.core.model_name(out.model))
        except RequestError as e:
            await abort_with(context, e)

    async def Abort(self, request: pb.AbortRequest, context):
        return pb.AbortResponse(aborted=self.core.abort(request.request_id))

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        try:
            ids, tokens = self.core.tokenize(request.text, request.add_special_tokens)
        except RequestError as e:
            await abort_with(context, e)
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def GetModelInfo(self, request, context):
        try:
            return model_info_to_proto(self.core.model_info())
        except RequestError as e:
            await abort_with(context, e)

    async def GetServerInfo(self, request, context):
        return server_info_to_proto(self.core.server_info(), self.core.state.small_model_name)
