"""Conversions between the tpserve.v1 protobuf messages and the engine's types."""

from __future__ import annotations

from tpserve.engine.engine import RequestOutput
from tpserve.engine.sampler import TokenLogprobs
from tpserve.engine.sampling_params import SamplingParams
from tpserve.v1 import generation_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_SCALARS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "ignore_eos", "min_tokens", "max_tokens", "logprobs")


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


def complete_response(out: RequestOutput, whole: RequestOutput | None = None) -> pb.GenerateResponse:
    """`whole` (non-streaming requests) carries the accumulated tokens, text and logprobs."""
    complete = pb.GenerateComplete(
        finish_reason=FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                       cached_tokens=out.num_cached_tokens),
        time_to_first_token_s=out.time_to_first_token or 0.0,
    )
    if whole is not None:
        complete.token_ids.extend(whole.new_token_ids)
        complete.text = whole.text
        complete.logprobs.extend(logprobs_to_proto(whole.logprobs))
    spec = getattr(out, "speculation", None)
    if spec:
        complete.speculation.CopyFrom(pb.SpeculationStats(**spec))
    return pb.GenerateResponse(request_id=out.request_id, complete=complete)
