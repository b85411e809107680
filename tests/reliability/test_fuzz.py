"""Hostile input against a real server (torchrun, 2 gloo ranks): property-based fuzzing with
hypothesis of OpenAI JSON bodies, tpserve.v1 requests (typed, and raw bytes) and OIP v2 requests,
plus schemathesis driven by the server's own /openapi.json. No request may crash anything or get a
5xx / INTERNAL / UNKNOWN; a rejection is a 4xx / INVALID_ARGUMENT (or NOT_FOUND for a model name,
RESOURCE_EXHAUSTED for an oversized message) whose message names the offending field; and after
all of it the server gives exactly the greedy output it gave before.

TPSERVE_FUZZ_EXAMPLES sets the examples per target (CI: 150); TPSERVE_FUZZ_RESULTS=FILE writes the
counts (benchmarks/fuzz.py runs this module with 10,000+ requests in all)."""

from __future__ import annotations

import collections
import json
import math
import os
import struct

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.e2e.test_http import CHAT_TEMPLATE
from tests.server_proc import ServerProc
from tests.tiny_models import build_tiny_model_with_tokenizer
from tpserve.client import build_request
from tpserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from tpserve.v1 import generation_pb2 as pb
from tpserve.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TPSERVE_FUZZ_EXAMPLES", "150"))
# CI draws the same examples every run (derandomize, hypothesis's advice for CI) so a run is
# reproducible; benchmarks/fuzz.py sets TPSERVE_FUZZ_RANDOM=1 to explore fresh ones.
RANDOM = os.environ.get("TPSERVE_FUZZ_RANDOM") == "1"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                suppress_health_check=list(HealthCheck))
COUNTS: collections.Counter = collections.Counter()  # (target, outcome) -> requests
MAX_MESSAGE_BYTES = 1 << 20
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    model_dir = build_tiny_model_with_tokenizer(tiny_dir)
    template = tmp_path_factory.mktemp("fuzz_template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    srv = ServerProc(model_dir, tmp_path_factory.mktemp("fuzz") / "server.log",
                     extra=["--chat-template", str(template), "--num-kv-blocks", "256", "--block-size", "4", "--max-model-len", "96",
                            "--served-model-name", "tiny", "--max-message-bytes", str(MAX_MESSAGE_BYTES)])
    try:
        srv.wait_ready()
        srv.http = httpx.Client(base_url=srv.http_url, timeout=60)
        before = greedy(srv)
        yield srv
        assert greedy(srv) == before, "the server's greedy output changed after the fuzzing"
        assert srv.health() == 1 and srv.proc.poll() is None
        info = pb_grpc.GenerationStub(srv.channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.kv_blocks_in_use == 0 and info.num_running_requests == 0, info
        srv.http.close()
    finally:
        srv.close()
        if os.environ.get("TPSERVE_FUZZ_RESULTS"):
            with open(os.environ["TPSERVE_FUZZ_RESULTS"], "w") as f:
                json.dump({f"{target} {outcome}": n for (target, outcome), n in sorted(COUNTS.items())}, f, indent=1)


def greedy(srv) -> tuple:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    r = srv.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    stub = pb_grpc.GenerationStub(srv.channel)
    *_, done = stub.Generate(build_request(PROMPT, False, max_tokens=24, temperature=0.0, ignore_eos=True), timeout=60)
    return r.json()["choices"][0]["text"], tuple(done.complete.token_ids)


# --- values ---------------------------------------------------------------------------------------
def nested(depth: int):
    return st.recursive(st.none() | st.integers() | st.text(max_size=3),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                        max_leaves=depth)


DEEP: list = [1]
for _ in range(64):  # nested deeper than any field's type
    DEEP = [DEEP]
HOSTILE = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, -(2**31) - 1, 2**63, -(2**63), 10**30, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e-308, 5e-324]),
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=10),
    st.sampled_from(["", " ", "\x00", "\ud7ff\ue000", "🦙" * 50, "x" * 300_000]),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=6),
    st.lists(st.text(max_size=5), max_size=4),
    nested(40),
    st.just(DEEP),
)


def names_a_field(message: str, param, fields: set[str]) -> bool:
    return any(f and (f in message or (param and str(param).split(".")[0] == f)) for f in fields)


# --- OpenAI JSON ----------------------------------------------------------------------------------
COMPLETION_FIELDS = sorted(CompletionRequest.model_fields)
CHAT_FIELDS = sorted(ChatCompletionRequest.model_fields)
ROUTE_BASE = {
    "/v1/completions": ({"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}, COMPLETION_FIELDS),
    "/v1/chat/completions": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                             CHAT_FIELDS),
}


@st.composite
def openai_case(draw):
    route = draw(st.sampled_from(sorted(ROUTE_BASE)))
    base, fields = ROUTE_BASE[route]
    body = dict(base)
    names = draw(st.lists(st.sampled_from(fields) | st.text(min_size=1, max_size=12), min_size=1, max_size=3,
                          unique=True))
    for name in names:
        body[name] = draw(HOSTILE)
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return route, body, set(names)


def read_openai(r: httpx.Response, streaming: bool) -> list[dict]:
    """The SSE chunks' error objects, if the response streamed."""
    errors = []
    if streaming and r.status_code == 200:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"])
    else:
        r.read()
    return errors


CHAT = "/v1/chat/completions"
CHAT_BASE = ROUTE_BASE[CHAT][0]


@FUZZ
@given(case=openai_case())
# Found by fuzzing: errors that did not name the field they were about.
@example(case=(CHAT, {**CHAT_BASE, "stop_token_ids": [-1]}, {"stop_token_ids"}))
@example(case=(CHAT, {**CHAT_BASE, "max_completion_tokens": -5}, {"max_completion_tokens"}))
@example(case=(CHAT, {**CHAT_BASE, "max_completion_tokens": 0}, {"max_completion_tokens"}))
@example(case=("/v1/completions", {**ROUTE_BASE["/v1/completions"][0], "prompt": [1, 99999]}, {"prompt"}))
def test_openai_json_bodies(server, case):
    route, body, mutated = case
    data = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    with server.http.stream("POST", route, content=data, headers={"content-type": "application/json"}) as r:
        errors = read_openai(r, body.get("stream") is True)
        COUNTS[("openai", str(r.status_code))] += 1
        assert r.status_code < 500, f"{r.status_code} for {body!r}: {r.text[:300]}"
        assert all(e.get("code") not in ("internal", "unavailable") for e in errors), errors
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"], r.text
            if r.status_code == 400:
                assert names_a_field(error["message"], error.get("param"), mutated | {"body", "prompt", "messages"}), \
                    f"{error} does not name one of {mutated} for {body!r}"[:2000]


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
       route=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health"]))
def test_openai_raw_bodies(server, raw, route):
    r = server.http.post(route, content=raw, headers={"content-type": "application/json"})
    COUNTS[("openai-raw", str(r.status_code))] += 1
    assert r.status_code < 500, r.text[:300]


# --- tpserve.v1 -----------------------------------------------------------------------------------
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@st.composite
def grpc_request(draw):
    sampling = {}
    for name, strategy in [("temperature", FLOAT32), ("top_k", INT32), ("top_p", FLOAT32), ("min_p", FLOAT32),
                           ("repetition_penalty", FLOAT32), ("presence_penalty", FLOAT32),
                           ("frequency_penalty", FLOAT32), ("seed", st.integers(0, 2**64 - 1)),
                           ("stop", st.lists(st.text(max_size=300), max_size=20)),
                           ("stop_token_ids", st.lists(INT32, max_size=5)), ("ignore_eos", st.booleans()),
                           ("min_tokens", INT32), ("max_tokens", INT32 | st.integers(0, 8)), ("logprobs", INT32)]:
        if draw(st.booleans()):
            sampling[name] = draw(strategy)
    prompt = draw(st.text(max_size=200) | st.lists(INT32 | st.integers(0, 4000), max_size=120))
    req = build_request(prompt, draw(st.booleans()), request_id=draw(st.text(max_size=40)),
                        model=draw(st.sampled_from(["", "tiny", "auto"] * 3) | st.text(max_size=10)))
    if draw(st.booleans()):
        req.sampling.CopyFrom(pb.SamplingParams(**sampling))
    return req


GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}


def call_generate(server, req) -> tuple[grpc.StatusCode, str]:
    stub = pb_grpc.GenerationStub(server.channel)
    try:
        for _ in stub.Generate(req, timeout=60):  # (one message without `stream`)
            pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


@FUZZ
@given(req=grpc_request())
def test_tpserve_v1_requests(server, req):
    code, details = call_generate(server, req)
    COUNTS[("tpserve.v1", code.name)] += 1
    assert code in GRPC_OK, f"{code.name}: {details} for {req}"[:2000]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        fields = {f.name for f, _ in req.sampling.ListFields()} | {"prompt", "token", "request id", "text"}
        assert names_a_field(details, None, fields), f"{details!r} names none of {fields}"


@FUZZ
@given(raw=st.binary(max_size=400))
def test_tpserve_v1_raw_bytes(server, raw):
    call = server.channel.unary_stream("/tpserve.v1.Generation/Generate", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
    try:
        for _ in call(raw, timeout=60):
            pass
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    COUNTS[("tpserve.v1-raw", code.name)] += 1
    assert code in GRPC_OK, f"{code.name}: {details} for {raw!r}"


def test_an_oversized_message_is_refused(server):
    req = build_request([5] * (2 * MAX_MESSAGE_BYTES), False, max_tokens=1)
    code, details = call_generate(server, req)
    COUNTS[("tpserve.v1", code.name)] += 1
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


# --- OIP v2 ---------------------------------------------------------------------------------------
@st.composite
def kserve_request(draw):
    from tritonclient.grpc import service_pb2 as kpb

    req = kpb.ModelInferRequest(model_name=draw(st.sampled_from(["tiny"] * 6 + ["", "auto"]) | st.text(max_size=8)),
                                id=draw(st.text(max_size=20)))
    names = ["text_input", "max_tokens", "sampling_parameters", "stream", "temperature", "exclude_input_in_output"]
    raw = draw(st.booleans())
    if draw(st.booleans()):  # most requests carry a valid prompt, so the rest of them is what is checked
        t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        if raw:
            req.raw_input_contents.append(struct.pack("<I", 5) + b"hello")
        else:
            t.contents.bytes_contents.append(b"hello")
    for _ in range(draw(st.integers(0, 4))):
        t = req.inputs.add(name=draw(st.sampled_from(names) | st.text(max_size=8)),
                           datatype=draw(st.sampled_from(["BYTES", "INT32", "INT64", "FP32", "BOOL", "UINT8", "FP16"])
                                         | st.text(max_size=5)))
        t.shape.extend(draw(st.lists(st.integers(-(2**40), 2**40), max_size=3)))
        if raw:
            req.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            kind = draw(st.sampled_from(["bytes", "int", "fp32", "bool", "int64"]))
            if kind == "bytes":
                t.contents.bytes_contents.extend(draw(st.lists(
                    st.binary(max_size=40) | st.sampled_from([b"hello", b'{"temperature": 0}', b"[1]", b'"x"']),
                    max_size=3)))
            elif kind == "int":
                t.contents.int_contents.extend(draw(st.lists(INT32, max_size=3)))
            elif kind == "int64":
                t.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
            elif kind == "fp32":
                t.contents.fp32_contents.extend(draw(st.lists(FLOAT32, max_size=3)))
            else:
                t.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["stream", "max_tokens", "temperature", "top_k", "seed"]) | st.text(max_size=6))
        p = req.parameters[key]
        choice = draw(st.sampled_from(["bool", "int", "str", "double", "uint"]))
        if choice == "bool":
            p.bool_param = draw(st.booleans())
        elif choice == "int":
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif choice == "uint":
            p.uint64_param = draw(st.integers(0, 2**64 - 1))
        elif choice == "double":
            p.double_param = draw(st.floats(allow_nan=True))
        else:
            p.string_param = draw(st.text(max_size=20))
    return req


@FUZZ
@given(req=kserve_request())
def test_oip_v2_requests(server, req):
    from tritonclient.grpc import service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(server.channel)
    try:
        stub.ModelInfer(req, timeout=60)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    COUNTS[("oip-v2", code.name)] += 1
    assert code in GRPC_OK, f"{code.name}: {details} for {req}"[:2000]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        fields = {t.name for t in req.inputs} | set(req.parameters) | {"text_input", "input", "sampling", "model"}
        assert names_a_field(details, None, fields), f"{details!r} names none of {fields}"


# --- schemathesis, from the server's own OpenAPI document -----------------------------------------
def test_schemathesis_from_openapi(server):
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    failures = []

    for operation in schema.get_all_operations():
        op = operation.ok()

        @FUZZ
        @given(case=op.as_strategy())
        def run(case):
            response = case.call(base_url=server.http_url, timeout=60)
            COUNTS[("schemathesis", str(response.status_code))] += 1
            if response.status_code >= 500:
                failures.append((op.label, response.status_code, response.text[:300], case.body))
            elif response.status_code >= 400:
                assert response.json()["error"]["message"], response.text

        run()
    assert not failures, failures[:5]
