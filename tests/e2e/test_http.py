"""The OpenAI-compatible HTTP front door for real: torchrun with 2 gloo ranks on loopback, the
`openai` SDK and httpx as clients, gRPC beside it on the same engine, Prometheus metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_serve import wait_idle
from tests.server_proc import ROOT, ServerProc
from tests.tiny_models import build_tiny_model_with_tokenizer
from tpserve.client import Client

pytestmark = pytest.mark.slow
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def chat_model(tiny_dir):
    """The tokenizer-carrying tiny model, plus a chat template."""
    src = build_tiny_model_with_tokenizer(tiny_dir)
    out = tiny_dir / "llama_tok_chat"
    if not out.exists():
        shutil.copytree(src, out)
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    srv = ServerProc(chat_model, tmp_path_factory.mktemp("http") / "server.log",
                     extra=["--num-kv-blocks", "400", "--block-size", "4", "--max-num-seqs", "32",
                            "--served-model-name", "tiny", "--max-queued-requests", "64"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metrics_of(server) -> dict[tuple, float]:
    text = httpx.get(server.http_url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_completions_whole_and_streamed_equal_grpc(server, client):
    prompt = "def add(a, b):\n"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, **GREEDY)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    streamed, finish = [], None
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY):
        if chunk.choices:
            streamed.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        else:
            assert chunk.usage.completion_tokens == 12 and chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert "".join(streamed) == whole.choices[0].text and finish == "length"
    with Client(server.address) as c:
        assert c.generate(prompt, max_tokens=12, temperature=0.0, ignore_eos=True).text == whole.choices[0].text


def test_greedy_http_equals_offline_generate_cli(server, client, chat_model, tmp_path):
    prompts = [[5, 6, 7, 8], [100, 200, 300]]
    http = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, **GREEDY)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "--model", str(chat_model), "--input",
                          str(inp), "--output", str(out), "--max-tokens", "10", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    offline = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert [c.text for c in sorted(http.choices, key=lambda c: c.index)] == offline


def test_n_samples_with_a_seed_are_reproducible_and_differ(client):
    kwargs = dict(model="tiny", prompt="def f(x):", max_tokens=8, n=3, seed=11, temperature=1.0)
    first = [c.text for c in sorted(client.completions.create(**kwargs).choices, key=lambda c: c.index)]
    again = [c.text for c in sorted(client.completions.create(**kwargs).choices, key=lambda c: c.index)]
    assert first == again and len(set(first)) == 3


def test_logprobs_echo_and_prompt_scoring(client):
    out = client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=3, logprobs=2, echo=True, **GREEDY)
    lp = out.choices[0].logprobs
    prompt_len = out.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == prompt_len + 3
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert out.choices[0].text.startswith("x = 1\n") and lp.text_offset == sorted(lp.text_offset)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    scored = client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=0, logprobs=0, echo=True)
    assert scored.usage.completion_tokens == 0 and scored.choices[0].text == "x = 1\n"
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:prompt_len], abs=1e-5)


def test_echo_logprobs_equal_teacher_forced_log_softmax_at_tp2(client, chat_model):
    import torch

    from tests.tiny_models import load_hf

    prompt = [5, 17, 300, 42, 1000, 7, 7, 9, 2500, 3]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    got = out.choices[0].logprobs.token_logprobs
    with torch.no_grad():
        ref = load_hf(chat_model)(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long)
                                  ).logits[0].log_softmax(-1)
    assert got[0] is None and len(got) == len(prompt)
    worst = max(abs(got[i] - float(ref[i - 1, prompt[i]])) for i in range(1, len(prompt)))
    assert worst < 1e-4, worst
    print(f"\nHTTP echo at TP 2: largest prompt-logprob difference from transformers {worst:.2e}")


def test_chat_whole_streamed_and_logprobs(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, logprobs=True,
                                           top_logprobs=2, **GREEDY)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 8 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_a_template_is_a_400_that_says_how(tmp_path_factory, tiny_dir):
    srv = ServerProc(build_tiny_model_with_tokenizer(tiny_dir), tmp_path_factory.mktemp("notpl") / "s.log", nproc=1,
                     extra=["--num-kv-blocks", "64", "--served-model-name", "plain"])
    try:
        srv.wait_ready()
        res = httpx.post(srv.http_url + "/v1/chat/completions", timeout=30,
                         json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
        assert res.status_code == 400 and "--chat-template FILE" in res.json()["error"]["message"]
    finally:
        srv.close()


BAD = [
    ({"model": "other", "prompt": "a"}, 404, "not served here"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature=-1.0 must be in [0, 100]"),
    ({"model": "tiny", "prompt": [1, 2], "max_tokens": 600}, 400, "602 exceeds the max model length 512"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "token id 99999 is outside the vocabulary [0, 4096)"),
    ({"model": "tiny", "prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens=0 must be >= 1"),
    ({"model": "tiny", "prompt": "a", "best_of": 2}, 400, "best_of"),
    ({"model": "tiny", "prompt": "a", "stream": True, "top_p": 3}, 400, "top_p=3.0 must be in (0, 1]"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"5000": 1}}, 400, "logit_bias token id 5000"),
    ({"model": "tiny", "prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_get_their_status_in_the_openai_envelope(server, body, status, message):
    res = httpx.post(server.http_url + "/v1/completions", json=body, timeout=30)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(server.http_url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


ABORTED = ("tpserve:request_success_total", (("finished_reason", "abort"), ("model_name", "tiny")))


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_disconnect_aborts_the_request_and_frees_its_blocks(server, stream):
    with Client(server.address) as c:
        wait_idle(c)
        aborted = metrics_of(server).get(ABORTED, 0.0)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "stream": stream, "ignore_eos": True}
        with httpx.Client(timeout=30) as http:
            if stream:
                with http.stream("POST", server.http_url + "/v1/completions", json=body) as res:
                    assert res.status_code == 200
                    lines = res.iter_lines()
                    while not next(lines).startswith("data:"):
                        pass
                    assert c.server_info().kv_blocks_in_use > 0
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post(server.http_url + "/v1/completions", json=body, timeout=1.0)
        wait_idle(c)
        assert metrics_of(server).get(ABORTED, 0.0) == aborted + 1


def test_endpoints_and_metrics_count_a_known_workload(server, client):
    assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.http_url + "/version").json()["version"]
    assert "/v1/completions" in httpx.get(server.http_url + "/openapi.json").json()["paths"]
    ids = httpx.post(server.http_url + "/tokenize", json={"prompt": "def f():"}).json()["tokens"]
    assert httpx.post(server.http_url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "def f():"
    with Client(server.address) as c:
        wait_idle(c)
    before = metrics_of(server)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11] * 9]
    for i, p in enumerate(prompts):
        client.completions.create(model="tiny", prompt=p, max_tokens=4 + i, **GREEDY)
    with Client(server.address) as c:  # gRPC traffic counts too
        c.generate([12, 13], max_tokens=3, temperature=0.0, ignore_eos=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the engine loop publishes its statistics after each step
        after = metrics_of(server)
        if after[("tpserve:generation_tokens_total", (("model_name", "tiny"),))] >= \
                before[("tpserve:generation_tokens_total", (("model_name", "tiny"),))] + 18:
            break
        time.sleep(0.1)
    label = (("model_name", "tiny"),)

    def delta(name, labels=label):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert delta("tpserve:prompt_tokens_total") == 3 + 5 + 9 + 2
    assert delta("tpserve:generation_tokens_total") == 4 + 5 + 6 + 3
    assert delta("tpserve:request_generation_tokens_sum") == 18 and delta("tpserve:request_generation_tokens_count") == 4
    assert delta("tpserve:request_prompt_tokens_sum") == 19
    assert delta("tpserve:time_to_first_token_seconds_count") == 4
    assert delta("tpserve:inter_token_latency_seconds_count") == 3 + 4 + 5 + 2
    assert delta("tpserve:request_success_total", (("finished_reason", "length"), ("model_name", "tiny"))) == 4
    assert after[("tpserve:num_requests_running", label)] == 0
    assert after[("tpserve:kv_cache_usage_perc", label)] == 0
