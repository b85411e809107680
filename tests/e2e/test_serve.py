"""The gRPC server for real: torchrun with 2 gloo ranks on loopback, Python gRPC clients."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from tests.server_proc import ServerProc
from tests.tiny_models import build_tiny_model_with_tokenizer, load_hf
from tpserve.client import Client, build_request
from tpserve.v1 import generation_pb2 as pb

pytestmark = pytest.mark.slow
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return build_tiny_model_with_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProc(model_dir, tmp_path_factory.mktemp("serve") / "server.log",
                     extra=["--num-kv-blocks", "400", "--block-size", "4", "--max-num-seqs", "64",
                            "--max-message-bytes", "65536", "--served-model-name", "tiny"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def wait_idle(client, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.server_info()
        if info.num_running_requests == 0 and info.num_waiting_requests == 0 and info.kv_blocks_in_use == 0:
            return info
        time.sleep(0.05)
    raise AssertionError(f"server did not become idle: {client.server_info()}")


def test_concurrent_streams_match_offline_greedy(server, model_dir):
    hf = load_hf(model_dir)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 4096, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (32,), generator=g)]
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    got, usage = [None] * 32, [None] * 32

    def run(i):
        with Client(server.address) as c:
            tokens = []
            for resp in c.generate_stream(prompts[i], max_tokens=16, temperature=0.0, ignore_eos=True):
                if resp.HasField("chunk"):
                    tokens += resp.chunk.token_ids
                else:
                    usage[i] = resp.complete
            got[i] = tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
    assert all(u.finish_reason == pb.FINISH_REASON_LENGTH and u.usage.completion_tokens == 16 for u in usage)
    assert [u.usage.prompt_tokens for u in usage] == [len(p) for p in prompts]


def test_text_prompt_stop_string_and_non_streaming(server):
    with Client(server.address) as c:
        full = c.generate("def add(a, b):\n", max_tokens=24, temperature=0.0, ignore_eos=True)
        assert full.finish_reason == "length" and len(full.token_ids) == 24
        streamed = "".join(r.chunk.text for r in c.generate_stream("def add(a, b):\n", max_tokens=24,
                                                                     temperature=0.0, ignore_eos=True)
                           if r.HasField("chunk"))
        assert streamed == full.text
        stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
        if not stop.strip() or stop not in full.text:
            pytest.skip("degenerate output text")
        cut = c.generate("def add(a, b):\n", max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(stop)]


def test_cancel_and_deadline_free_blocks(server):
    with Client(server.address) as c:
        call = c.stub.Generate(build_request([5, 6, 7], True, max_tokens=480, temperature=0.0, ignore_eos=True))
        next(call), next(call)
        assert c.server_info().kv_blocks_in_use > 0
        call.cancel()
        wait_idle(c)
        with pytest.raises(grpc.RpcError) as err:
            list(c.stub.Generate(build_request([8, 9], True, max_tokens=480, temperature=0.0, ignore_eos=True),
                                 timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        info = wait_idle(c)
        assert info.kv_blocks_free + info.kv_blocks_cached == info.kv_blocks_total


VALIDATION = [
    ("empty token ids", dict(prompt=[]), "prompt is empty"),
    ("empty text", dict(prompt=""), "prompt is empty"),
    ("token outside vocab", dict(prompt=[1, 99999]), "token id 99999 is outside the vocabulary [0, 4096)"),
    ("too long", dict(prompt=[1, 2], max_tokens=600), "602 exceeds the max model length 512"),
    ("temperature", dict(prompt=[1], temperature=-1.0), "temperature=-1.0 must be in [0, 100]"),
    ("top_p", dict(prompt=[1], top_p=2.0), "top_p=2.0 must be in (0, 1]"),
    ("top_k", dict(prompt=[1], top_k=5000), "top_k=5000 exceeds the vocabulary size 4096"),
    ("too many stops", dict(prompt=[1], stop=["x"] * 17), "17 stop strings given; at most 16"),
    ("stop too long", dict(prompt=[1], stop=["y" * 300]), "stop string of length 300 exceeds the limit 256"),
    ("max_tokens 0", dict(prompt=[1], max_tokens=0), "max_tokens=0 must be >= 1"),
]


@pytest.mark.parametrize("name,kwargs,message", VALIDATION, ids=[v[0] for v in VALIDATION])
def test_invalid_requests_fail_alone(server, name, kwargs, message):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with Client(server.address) as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.stub.Generate(build_request(prompt, True, **kwargs)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
        assert c.generate([1, 2, 3], max_tokens=2).completion_tokens == 2  # the server keeps serving


def test_missing_input_and_oversized_message(server):
    with Client(server.address) as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.stub.Generate(pb.GenerateRequest(stream=True)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "neither text nor token_ids" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.generate("x" * 70000, max_tokens=1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.generate([1, 2, 3], max_tokens=1).completion_tokens == 1


def test_info_tokenize_abort_and_reflection(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with Client(server.address) as c:
        info = c.model_info()
        assert (info.served_model_name, info.architecture, info.max_model_len, info.vocab_size, info.tp_size) == \
            ("tiny", "LlamaForCausalLM", 512, 4096, 2)
        ids = c.tokenize("def f():\n    return 1\n")
        assert ids and all(0 <= i < 4096 for i in ids)
        assert c.abort("no-such-request") is False
        call = c.stub.Generate(build_request([3, 4], True, request_id="to-abort", max_tokens=480, ignore_eos=True))
        next(call)
        assert c.abort("to-abort") is True
        last = list(call)[-1]
        assert last.complete.finish_reason == pb.FINISH_REASON_ABORT
        wait_idle(c)
    services = set(ProtoReflectionDescriptorDatabase(server.channel).get_services())
    assert {"tpserve.v1.Generation", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_tritonclient_unary_and_streaming(server):
    import numpy as np
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta.outputs[0].name == "text_output"

    def inputs(stream):
        text = tc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array(["def add(a, b):\n".encode()], dtype=object))
        flag = tc.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([stream]))
        params = tc.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([b'{"max_tokens": 12, "temperature": 0, "ignore_eos": true}'],
                                            dtype=object))
        excl = tc.InferInput("exclude_input_in_output", [1], "BOOL")
        excl.set_data_from_numpy(np.array([True]))
        return [text, flag, params, excl]

    unary = client.infer("tiny", inputs(False)).as_numpy("text_output")[0].decode()
    with Client(server.address) as c:
        assert unary == c.generate("def add(a, b):\n", max_tokens=12, temperature=0.0, ignore_eos=True).text

    pieces, done = [], threading.Event()

    def callback(result, error):
        if error is not None:
            pieces.append(error)
            done.set()
            return
        pieces.append(result.as_numpy("text_output")[0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client.start_stream(callback=callback)
    client.async_stream_infer("tiny", inputs(True), request_id="s1")
    assert done.wait(60)
    client.stop_stream()
    assert all(isinstance(p, str) for p in pieces), pieces
    assert "".join(pieces) == unary and len(pieces) > 1
    with pytest.raises(tc.InferenceServerException, match="not served here"):
        client.infer("other-model", inputs(False))


def test_lifecycle_queue_limit_and_sigterm_drain(model_dir, tmp_path):
    # A large KV cache makes loading take long enough to be observed.
    srv = ServerProc(model_dir, tmp_path / "b.log",
                     extra=["--kv-cache-memory", str(3 * 2**30), "--max-num-seqs", "1", "--max-queued-requests", "2",
                            "--shutdown-timeout", "120"])
    try:
        seen = []
        srv.wait_ready(seen=seen)
        assert seen[0] == NOT_SERVING and seen[-1] == SERVING, seen
        assert srv.health("") == SERVING
        # Queue limit: one running, two waiting, the rest refused.
        calls = [Client(srv.address).stub.Generate(build_request([4, 5], True, max_tokens=400, ignore_eos=True))
                 for _ in range(6)]
        codes = []
        for call in calls:
            try:
                next(call)
                codes.append("ok")
            except grpc.RpcError as e:
                codes.append(e.code())
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "--max-queued-requests=2" in e.details()
            if codes[-1] == "ok" and len(codes) == 1:
                time.sleep(0.5)  # let the first request start running
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
        for call in calls:
            call.cancel()
        with Client(srv.address) as c:
            wait_idle(c)
            # SIGTERM while a request streams: it finishes, new ones are refused, ranks exit 0.
            stream = c.stub.Generate(build_request([6, 7], True, max_tokens=150, temperature=0.0, ignore_eos=True))
            first = next(stream)
            srv.signal_ranks(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while srv.health() != NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv.health() == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                c.generate([1, 2], max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            rest = list(stream)
        tokens = list(first.chunk.token_ids) + [t for r in rest if r.HasField("chunk") for t in r.chunk.token_ids]
        assert rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH and len(tokens) == 150
        assert srv.wait(60) == 0, srv.tail()
    finally:
        srv.close()


def test_killed_worker_ends_group_with_unavailable(model_dir, tmp_path):
    srv = ServerProc(model_dir, tmp_path / "c.log", extra=["--num-kv-blocks", "200"])
    try:
        srv.wait_ready()
        with Client(srv.address) as c:
            stream = c.stub.Generate(build_request([6, 7], True, max_tokens=480, ignore_eos=True))
            next(stream)
            os.kill(srv.rank_pids()[1], signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        start = time.monotonic()
        code = srv.wait(60)
        assert code != 0
        print(f"\ngroup exited with {code} {time.monotonic() - start:.1f}s after the client saw UNAVAILABLE")
    finally:
        srv.close()


def test_ranks_exit_when_torchrun_is_killed(model_dir, tmp_path):
    srv = ServerProc(model_dir, tmp_path / "d.log", extra=["--num-kv-blocks", "200"])
    try:
        srv.wait_ready()
        ranks = srv.rank_pids()
        assert sorted(ranks) == [0, 1]
        os.kill(srv.proc.pid, signal.SIGKILL)  # the launcher only: no chance to forward anything
        srv.wait(30)
        deadline = time.monotonic() + 30
        alive = set(ranks.values())
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()
                     and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"}
            time.sleep(0.1)
        assert not alive, f"ranks {alive} outlived torchrun"
    finally:
        srv.close()
