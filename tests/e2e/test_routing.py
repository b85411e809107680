"""Routing through a real server (torchrun, 2 gloo ranks): the small model lives on rank 0 beside
the sharded target; requests choose it by name over gRPC and HTTP, `auto` is routed by the cascade
policy; every response names the model that served it and the router's score; /v1/models,
GetServerInfo and /metrics report routing and the audit; and nothing is left behind."""

from __future__ import annotations

import grpc
import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_serve import wait_idle
from tests.server_proc import ServerProc
from tests.tiny_models import build_tiny_model, load_hf
from tpserve.client import Client

pytestmark = pytest.mark.slow
PROMPTS = [[5 + i, 17, 40 + 3 * i, 99, 23, 7 + i, 150 - i] for i in range(8)]


@pytest.fixture(scope="module")
def models(tiny_dir):
    return build_tiny_model(tiny_dir, "llama_gqa"), build_tiny_model(tiny_dir, "llama_mqa", seed=1)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    target, small = models
    srv = ServerProc(target, tmp_path_factory.mktemp("route") / "server.log",
                     extra=["--num-kv-blocks", "300", "--block-size", "4", "--served-model-name", "tiny",
                            "--small-model", str(small), "--small-model-name", "tiny-small",
                            "--route-policy", "cascade", "--route-cascade-tokens", "2",
                            "--route-small-fraction", "0.5", "--route-audit-rate", "1"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def hf_greedy(model_dir, ids, n):
    model = load_hf(model_dir)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def completion(server, model, prompt, n=6):
    res = httpx.post(server.http_url + "/v1/completions", timeout=60,
                     json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    return res


def test_models_are_listed_and_chosen_by_name(server, models):
    names = [m["id"] for m in httpx.get(server.http_url + "/v1/models").json()["data"]]
    assert names == ["tiny", "tiny-small", "auto"]
    p = PROMPTS[0]
    for name, model_dir in (("tiny", models[0]), ("tiny-small", models[1])):
        body = completion(server, name, p).json()
        assert body["model"] == name and "route" not in body["choices"][0]
        with Client(server.address) as c:
            done = c.generate(p, model=name, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert done.model == name and done.route is None
        assert done.token_ids == hf_greedy(model_dir, p, 6)
    with Client(server.address) as c:
        assert c.generate(p, max_tokens=2, temperature=0.0).model == "tiny", "no model: the target"
        assert c.model_info().small_model_name == "tiny-small"


def test_unknown_model_names_the_served_ones(server):
    res = completion(server, "gpt-4", PROMPTS[0])
    assert res.status_code == 404
    assert "'tiny', 'tiny-small', 'auto'" in res.json()["error"]["message"]
    with Client(server.address) as c, pytest.raises(grpc.RpcError) as e:
        c.generate(PROMPTS[0], model="gpt-4", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "tiny-small" in e.value.details()


def test_auto_requests_report_the_serving_model_and_the_score(server, models):
    served = []
    with Client(server.address) as c:
        for p in PROMPTS[:4]:
            done = c.generate(p, model="auto", max_tokens=6, temperature=0.0, ignore_eos=True)
            assert done.route.policy == "cascade" and done.route.HasField("score")
            assert done.model == ("tiny" if done.route.handed_over else "tiny-small")
            assert (done.route.score >= done.route.threshold) == (done.model == "tiny-small")
            assert done.token_ids[:2] == hf_greedy(models[1], p, 2)
            served.append(done.model)
    for p in PROMPTS[4:]:
        body = completion(server, "auto", p).json()
        route = body["choices"][0]["route"]
        assert body["model"] == route["model"] and route["policy"] == "cascade"
        assert isinstance(route["score"], float)
        served.append(body["model"])
    # Streamed: each chunk names the model serving it; the last one carries the route.
    with httpx.stream("POST", server.http_url + "/v1/completions", timeout=60,
                      json={"model": "auto", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as res:
        chunks = [line for line in res.iter_lines() if line.startswith("data: {")]
    assert '"route"' in chunks[-1]
    assert set(served) <= {"tiny", "tiny-small"}


def test_server_info_and_metrics_count_routing_and_audits(server):
    with Client(server.address) as c:
        for p in PROMPTS:
            c.generate(p, model="auto", max_tokens=4, temperature=0.0, ignore_eos=True)
        c.generate(PROMPTS[2], model="tiny-small", max_tokens=4, temperature=0.0, ignore_eos=True)
        info = wait_idle(c, timeout=30)
        r = info.routing
        assert r.small_model_name == "tiny-small" and r.policy == "cascade"
        assert r.num_auto_requests >= len(PROMPTS) and r.num_to_small + r.num_to_target == r.num_auto_requests
        assert r.num_handovers == r.num_to_target
        assert r.audit.num_audits >= 1 and r.audit.num_audits <= r.small_requests
    text = httpx.get(server.http_url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("tpserve:route_decisions_total", (("model_name", "tiny"), ("routed_to", "small")))] == r.num_to_small
    assert samples[("tpserve:route_handovers_total", (("model_name", "tiny"),))] == r.num_handovers
    assert samples[("tpserve:route_audits_total", (("model_name", "tiny"),))] >= 1
    assert ("tpserve:route_audit_quality_gap", (("model_name", "tiny"),)) in samples
    assert info.kv_blocks_in_use == 0
