"""KServe Open Inference Protocol v2 (`inference.GRPCInferenceService`) for existing Triton and
KServe clients, with the LLM conventions of Triton's LLM backends:

inputs   text_input BYTES [1] (required); stream BOOL [1]; exclude_input_in_output BOOL [1];
         sampling_parameters BYTES [1] (a JSON object of sampling fields); and any sampling field
         as its own scalar tensor (max_tokens INT32, temperature FP32, ...) or request parameter.
         Later sources override earlier ones: JSON, then tensors, then request parameters.
outputs  text_output BYTES [1]: the whole text (unary), or each new piece (stream = true, over
         ModelStreamInfer; the last response carries parameter triton_final_response = true).
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from dataclasses import fields

from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from tpserve.engine.sampling_params import SamplingParams
from tpserve.errors import InvalidRequest, RequestError
from tpserve.route.router import AUTO
from tpserve.server.convert import abort_with, grpc_status
from tpserve.server.core import ServingCore
from tpserve.server.outputs import OutputAccumulator

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_FIXED = {"BOOL": ("?", 1), "INT8": ("b", 1), "INT16": ("h", 2), "INT32": ("i", 4), "INT64": ("q", 8),
          "UINT8": ("B", 1), "UINT16": ("H", 2), "UINT32": ("I", 4), "UINT64": ("Q", 8), "FP32": ("f", 4),
          "FP64": ("d", 8)}


class InputError(InvalidRequest):
    """An OIP v2 input tensor or parameter that cannot be read."""


def kserve_service_name() -> str:
    return kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def add_kserve_to_server(servicer, server) -> None:
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def _decode_raw(name: str, datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        out, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise InputError(f"input {name!r}: raw BYTES content ends inside a length prefix at byte {i}")
            (n,) = struct.unpack_from("<I", raw, i)
            if i + 4 + n > len(raw):
                raise InputError(f"input {name!r}: raw BYTES element of {n} bytes at byte {i} runs past the "
                                 f"content's {len(raw)} bytes")
            out.append(raw[i + 4 : i + 4 + n])
            i += 4 + n
        return out
    if datatype not in _FIXED:
        raise InputError(f"input {name!r}: datatype {datatype!r} is not supported")
    code, size = _FIXED[datatype]
    if len(raw) % size:
        raise InputError(f"input {name!r}: {len(raw)} raw bytes are not a whole number of {datatype} "
                         f"elements of {size} bytes")
    return list(struct.unpack(f"<{len(raw) // size}{code}", raw))


# What each sampling parameter accepts from OIP v2's untyped inputs and JSON (bool is not a number).
_INT, _NUMBER = (int,), (int, float)
_SAMPLING_TYPES = {"max_tokens": _INT, "min_tokens": _INT, "top_k": _INT, "seed": _INT, "logprobs": _INT,
                   "prompt_logprobs": _INT, "temperature": _NUMBER, "top_p": _NUMBER, "min_p": _NUMBER,
                   "repetition_penalty": _NUMBER, "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
                   "ignore_eos": (bool,)}


def _check_sampling(sampling: dict) -> dict:
    """Each value of the type its SamplingParams field takes, or an InputError naming it."""
    for key, value in sampling.items():
        allowed = _SAMPLING_TYPES.get(key)
        if allowed is not None:
            optional = key in ("seed", "logprobs", "prompt_logprobs") and value is None
            if not optional and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
                raise InputError(f"sampling parameter {key}={value!r} must be of type "
                                 f"{' or '.join(t.__name__ for t in allowed)}")
        elif key in ("stop", "stop_token_ids"):
            kind = str if key == "stop" else int
            if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise InputError(f"sampling parameter {key}={value!r} must be a list of {kind.__name__}")
        elif key == "logit_bias":
            try:
                sampling[key] = {int(t): float(b) for t, b in dict(value).items()}
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"sampling parameter logit_bias={value!r} must map token ids to numbers") from None
    return sampling


def _decode_contents(tensor) -> list:
    c = tensor.contents
    for name in ("bytes_contents", "bool_contents", "int_contents", "int64_contents", "uint_contents",
                 "uint64_contents", "fp32_contents", "fp64_contents"):
        values = list(getattr(c, name))
        if values:
            return values
    return []


def _param_value(p):
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def parse_request(req) -> tuple[str, bool, bool, SamplingParams]:
    """-> (text, stream, exclude_input_in_output, params)."""
    values = {}
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InputError(f"raw_input_contents has {len(req.raw_input_contents)} entries for {len(req.inputs)} inputs")
    for i, tensor in enumerate(req.inputs):
        data = (_decode_raw(tensor.name, tensor.datatype, req.raw_input_contents[i]) if req.raw_input_contents
                else _decode_contents(tensor))
        if not data:
            raise InputError(f"input {tensor.name!r} is empty")
        values[tensor.name] = data[0]
    if "text_input" not in values:
        raise InputError("input 'text_input' (BYTES) is required")
    text = values.pop("text_input")
    if not isinstance(text, bytes):
        raise InputError(f"input 'text_input' must be BYTES (UTF-8 text), got {type(text).__name__} {text!r}")
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"input 'text_input' is not valid UTF-8: {e}") from None
    sampling = {}
    if "sampling_parameters" in values:
        raw = values.pop("sampling_parameters")
        try:
            parsed = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise InputError(f"sampling_parameters is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise InputError(f"sampling_parameters must be a JSON object, got {type(parsed).__name__}")
        sampling.update(parsed)
    options = {"stream": False, "exclude_input_in_output": False}
    for source in (values, {k: _param_value(v) for k, v in req.parameters.items()}):
        for key, value in source.items():
            if key in options:
                options[key] = bool(value)
            elif key in SAMPLING_FIELDS:
                sampling[key] = value
    unknown = set(sampling) - SAMPLING_FIELDS
    if unknown:
        raise InputError(f"unknown sampling parameters {sorted(unknown)}")
    params = SamplingParams(**_check_sampling(sampling))
    return text, options["stream"], options["exclude_input_in_output"], params


def _response(req, model_name: str, text: str, final: bool):
    resp = kpb.ModelInferResponse(model_name=model_name, model_version="1", id=req.id)
    resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    data = text.encode("utf-8")
    resp.raw_output_contents.append(struct.pack("<I", len(data)) + data)
    resp.parameters["triton_final_response"].bool_param = final
    return resp


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """A thin adapter on the serving core."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self.core.ready())

    async def ModelReady(self, request, context):
        return kpb.ModelReadyResponse(ready=(request.name in self.core.model_names or request.name == AUTO) and self.core.ready())

    async def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(name="tpserve", version="0.1.0", extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            self.core.check_model(request.name)
        except RequestError as e:
            await abort_with(context, e)
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=self.core.served_model_name, versions=["1"], platform="tpserve",
            inputs=[tensor(name="text_input", datatype="BYTES", shape=[1]),
                    tensor(name="stream", datatype="BOOL", shape=[1]),
                    tensor(name="exclude_input_in_output", datatype="BOOL", shape=[1]),
                    tensor(name="sampling_parameters", datatype="BYTES", shape=[1])],
            outputs=[tensor(name="text_output", datatype="BYTES", shape=[1])],
        )

    async def _infer(self, req, streaming: bool):
        """Yield (text, final) responses of one request: each new piece when `stream` is set
        (only inside ModelStreamInfer), else the whole text once."""
        self.core.check_model(req.model_name)
        model = self.core.resolve_model(req.model_name)
        text, stream, exclude_input, params = parse_request(req)
        if stream and not streaming:
            raise InvalidRequest("stream = true needs ModelStreamInfer")
        request_id = req.id or uuid.uuid4().hex
        whole = OutputAccumulator(request_id)
        async for out in self.core.generate(request_id, text, None, params, model=model):
            if stream:
                yield out.text, out.finished
            elif whole.add(out).finished:
                yield ("" if exclude_input else text) + whole.result.text, True

    async def ModelInfer(self, request, context):
        try:
            async for text, _ in self._infer(request, streaming=False):
                pass  # one response: the whole text
        except RequestError as e:
            await abort_with(context, e)
        return _response(request, self.core.served_model_name, text, True)

    async def ModelStreamInfer(self, request_iterator, context):
        """Each incoming request runs concurrently; a bad one gets an error_message and the rest
        of the stream carries on."""
        out_queue: asyncio.Queue = asyncio.Queue()
        tasks = set()

        async def serve_one(req):
            try:
                async for text, final in self._infer(req, streaming=True):
                    await out_queue.put(kpb.ModelStreamInferResponse(
                        infer_response=_response(req, req.model_name, text, final)))
            except RequestError as e:
                await out_queue.put(kpb.ModelStreamInferResponse(error_message=f"{grpc_status(e).name}: {e}"))

        async def reader():
            async for req in request_iterator:
                task = asyncio.ensure_future(serve_one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out_queue.put(None)

        read_task = asyncio.ensure_future(reader())
        try:
            while (item := await out_queue.get()) is not None:
                yield item
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()


__all__ = ["KServeServicer", "add_kserve_to_server", "kserve_service_name", "parse_request"]
