"""The HTTP app over a real EngineLoop on the fake model (tests/fake_engine.py), through FastAPI's
test client: statuses and envelopes that need a particular server state (loading, a full queue,
a failed group), streaming framing, and n choices sharing their prompt."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.unit.test_serving_core import Served
from tpserve.metrics import ServerMetrics
from tpserve.server.http import build_app
from tpserve.server.state import LOADING, ServerState


def client_for(served: Served) -> TestClient:
    return TestClient(build_app(served.core), raise_server_exceptions=False)


def test_loading_is_503_in_the_envelope():
    from tpserve.server.core import ServingCore

    client = TestClient(build_app(ServingCore(ServerState("fake"))))
    assert ServerState("fake").phase == LOADING
    res = client.get("/health")
    assert res.status_code == 503 and res.json()["error"]["message"] == "the model is still loading"
    res = client.post("/v1/completions", json={"model": "fake", "prompt": [1, 2]})
    assert res.status_code == 503 and res.json()["error"]["type"] == "service_unavailable_error"


def test_a_full_queue_is_429_with_retry_after():
    served = Served(max_queued_requests=0).start()
    try:
        res = client_for(served).post("/v1/completions", json={"model": "fake", "prompt": [1, 2], "stream": True})
        assert res.status_code == 429 and res.headers["retry-after"] == "1"
        assert "--max-queued-requests=0" in res.json()["error"]["message"]
    finally:
        served.stop()


def test_streamed_completion_choices_and_usage():
    served = Served().start()
    try:
        body = {"model": "fake", "prompt": [[4, 5, 6], [7, 8]], "max_tokens": 5, "temperature": 0, "n": 2,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with client_for(served).stream("POST", "/v1/completions", json=body) as res:
            assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in res.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                    and c["choices"][0]["finish_reason"]}
        assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 20,
                                                                       "total_tokens": 25}
        assert all("usage" not in c for c in chunks[:-1])
        # vLLM's continuous_usage_stats (GuideLLM sends it, with "stop": null): usage in every chunk, growing.
        body["stream_options"]["continuous_usage_stats"] = True
        body["stop"] = None
        with client_for(served).stream("POST", "/v1/completions", json=body) as res:
            assert res.status_code == 200
            chunks = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 20 and all(c["usage"]["prompt_tokens"] == 5 for c in chunks)
    finally:
        served.stop()


def test_n_greedy_choices_of_a_long_prompt_share_its_blocks():
    served = Served(block_size=4).start()
    try:
        prompt = list(range(3, 3 + 17))
        res = client_for(served).post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 3,
                                                               "temperature": 0, "n": 3, "ignore_eos": True})
        assert res.status_code == 200 and len(res.json()["choices"]) == 3
        stats = served.door.stats
        # The second and third samples found the first's four full prompt blocks in the prefix cache.
        assert stats.prefix_cache_hits == 2 * 16 and stats.prefix_cache_queries == 3 * 17
    finally:
        served.stop()


def test_a_group_failure_mid_stream_ends_it_with_an_error_event():
    served = Served(fail_at_step=4).start()
    body = {"model": "fake", "prompt": [4, 5], "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": True}
    with client_for(served).stream("POST", "/v1/completions", json=body) as res:
        events = [line for line in res.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and "a rank failed" in error["message"]
    served._thread.join(10)


def test_metrics_endpoint_and_off_switch():
    served = Served().start()
    try:
        served.core.metrics = ServerMetrics("fake", lambda: served.door.stats, 256, 64, {"tp_size": "1"})
        client = client_for(served)
        assert client.post("/v1/completions", json={"model": "fake", "prompt": [4, 5], "max_tokens": 3}).status_code \
            == 200
        text = client.get("/metrics").text
        assert 'tpserve:serving_config_info{model_name="fake",tp_size="1"} 1.0' in text
        served.core.metrics = None
        assert client.get("/metrics").status_code == 404
    finally:
        served.stop()


@pytest.mark.parametrize("prompt", [[9, 10, 11], [[9, 10, 11]]])
def test_token_prompts_give_the_models_tokens(prompt):
    served = Served().start()
    try:
        res = client_for(served).post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 6,
                                                               "temperature": 0, "ignore_eos": True, "logprobs": 0})
        choice = res.json()["choices"][0]
        # The fake model puts all but e^-20 of its mass on its next token: greedy takes it at logprob ~0.
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([0.0] * 6, abs=1e-5)
        assert choice["finish_reason"] == "length" and res.json()["usage"]["completion_tokens"] == 6
    finally:
        served.stop()


def test_the_samples_of_an_admitted_request_are_not_refused_by_the_queue_limit():
    """n samples are one request: once its first sample is queued, the others (submitted after
    it has output) skip the waiting-queue limit rather than fail a response already under way."""
    served = Served(max_queued_requests=1, max_num_seqs=1, step_seconds=0.002).start()
    try:
        body = {"model": "fake", "prompt": [4, 5, 6], "max_tokens": 6, "n": 4, "temperature": 0, "ignore_eos": True}
        res = client_for(served).post("/v1/completions", json=body)
        assert res.status_code == 200, res.text
        assert [c["finish_reason"] for c in res.json()["choices"]] == ["length"] * 4
        assert res.json()["usage"]["completion_tokens"] == 24
        assert served.engine.leftovers() == {}
    finally:
        served.stop()
