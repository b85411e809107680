"""Conversions between the tpserve.v1 protobuf messages and the serving core's types, and the
gRPC status of each kind of RequestError (shared by the tpserve.v1 and OIP v2 adapters)."""

from __future__ import annotations

from dataclasses import asdict

import grpc

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampler import TokenLogprobs
from tpserve.engine.sampling_params import SamplingParams
from tpserve.errors import InvalidRequest, RequestError
from tpserve.server.outputs import CompletedRequest
from tpserve.server.state import ModelInfo, ServerInfo
from tpserve.v1 import generation_pb2 as pb

GRPC_STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "internal": grpc.StatusCode.INTERNAL,
}
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_SCALARS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "ignore_eos", "min_tokens", "max_tokens", "logprobs")


def grpc_status(error: RequestError) -> grpc.StatusCode:
    return GRPC_STATUS[error.kind]


async def abort_with(context, error: RequestError) -> None:
    """End the call with the error's status and message (raises, as grpc.aio's abort does)."""
    await context.abort(grpc_status(error), str(error))


def prompt_from_proto(request: pb.GenerateRequest) -> tuple[str | None, list[int] | None]:
    """(text, token ids): exactly one is set."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("request has neither text nor token_ids")
    return (request.text, None) if which == "text" else (None, list(request.token_ids.ids))


def sampling_from_proto(msg: pb.SamplingParams, default_max_tokens: int = 16) -> SamplingParams:
    """Only fields the client set override the defaults (proto3 `optional` presence)."""
    kwargs = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    kwargs.setdefault("max_tokens", default_max_tokens)
    return SamplingParams(stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), **kwargs)


def logprobs_to_proto(items: list[TokenLogprobs]) -> list[pb.PositionLogprobs]:
    return [
        pb.PositionLogprobs(
            chosen=pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
            top=[pb.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in items
    ]


def chunk_response(out: RequestOutput) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=out.request_id,
        chunk=pb.GenerateChunk(token_ids=out.new_token_ids, text=out.text, logprobs=logprobs_to_proto(out.logprobs)),
    )


def complete_response(out: RequestOutput, whole: CompletedRequest | None = None,
                      model_name: str = "") -> pb.GenerateResponse:
    """`whole` (non-streaming requests) carries the accumulated tokens, text and logprobs;
    `model_name` names the model that served the request."""
    complete = pb.GenerateComplete(
        finish_reason=FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                       cached_tokens=out.num_cached_tokens),
        time_to_first_token_s=out.time_to_first_token or 0.0,
        model=model_name,
    )
    if out.route is not None:
        r = out.route
        complete.route.CopyFrom(pb.RouteInfo(policy=r.policy, score=r.score, threshold=r.threshold,
                                             handed_over=r.handed_over))
    if whole is not None:
        complete.token_ids.extend(whole.token_ids)
        complete.text = whole.text
        complete.logprobs.extend(logprobs_to_proto(whole.logprobs))
    if out.speculation is not None:
        complete.speculation.CopyFrom(pb.SpeculationStats(**asdict(out.speculation)))
    return pb.GenerateResponse(request_id=out.request_id, complete=complete)


def model_info_to_proto(info: ModelInfo) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(**asdict(info))


def server_info_to_proto(info: ServerInfo, small_model_name: str | None = None) -> pb.GetServerInfoResponse:
    msg = pb.GetServerInfoResponse(uptime_s=info.uptime_s, block_size=info.block_size, draining=info.draining)
    s = info.stats
    if s is None:
        return msg
    msg.num_waiting_requests = s.num_waiting
    msg.num_running_requests = s.num_running
    msg.kv_blocks_free = s.kv_blocks_free
    msg.kv_blocks_cached = s.kv_blocks_cached
    msg.kv_blocks_in_use = s.kv_blocks_in_use
    msg.kv_blocks_total = s.kv_blocks_total
    msg.prefix_cache_hit_rate = s.prefix_cache_hit_rate
    msg.num_finished_requests = info.num_finished_requests
    if s.speculation is not None:
        msg.speculation.CopyFrom(pb.SpeculationStats(**asdict(s.speculation)))
    r = s.routing
    if r is not None:
        msg.routing.CopyFrom(pb.RoutingStats(
            small_model_name=small_model_name or "", policy=r.policy or "", threshold=r.threshold,
            small_fraction=r.small_fraction,
            num_auto_requests=r.num_auto, num_to_small=r.num_to_small, num_to_target=r.num_to_target,
            num_handovers=r.num_handovers, small_requests=r.small_requests,
            small_generation_tokens=r.small_generation_tokens, audit=pb.RouteAudit(**r.audit)))
    return msg
