"""launch/generate.py from outside, as users and CI run it: under torchrun with 2 gloo ranks and
as a plain single process, against transformers' greedy generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_harness import free_port
from tests.tiny_models import build_tiny_model, load_hf

ROOT = Path(__file__).resolve().parents[2]
GENERATE = str(ROOT / "launch" / "generate.py")


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    model_dir = build_tiny_model(tiny_dir, "llama_mqa")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (4, 13, 21)]
    hf = load_hf(model_dir)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    work = tmp_path_factory.mktemp("gen")
    inp = work / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    return model_dir, inp, prompts, want, work


def _check_output(path, prompts, want):
    lines = sorted((json.loads(line) for line in Path(path).read_text().splitlines()), key=lambda o: o["index"])
    assert [o["index"] for o in lines] == list(range(len(prompts)))  # each once (written in finish order)
    for o, p, w in zip(lines, prompts, want):
        assert o["prompt_token_ids"] == p
        assert o["token_ids"] == w
        assert o["finish_reason"] == ("stop" if len(w) < 16 else "length")
        assert "text" not in o  # the tiny model has no tokenizer


@pytest.mark.slow
def test_torchrun_two_ranks(setup):
    model_dir, inp, prompts, want, work = setup
    out = work / "out_tp2.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), GENERATE, "--model", str(model_dir), "--input", str(inp), "--output", str(out),
           "--max-tokens", "16", "--temperature", "0", "--dtype", "float32", "--block-size", "8"]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(out, prompts, want)


def test_single_process(setup):
    model_dir, inp, prompts, want, work = setup
    out = work / "out_tp1.jsonl"
    proc = _run([sys.executable, GENERATE, "--model", str(model_dir), "--input", str(inp), "--output", str(out),
                 "--max-tokens", "16", "--dtype", "float32", "--num-kv-blocks", "64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_output(out, prompts, want)


def test_text_prompt_without_tokenizer_is_a_clear_error(setup):
    model_dir, _, _, _, work = setup
    inp = work / "text.jsonl"
    inp.write_text(json.dumps({"prompt": "hello"}) + "\n")
    proc = _run([sys.executable, GENERATE, "--model", str(model_dir), "--input", str(inp),
                 "--output", str(work / "x.jsonl"), "--max-tokens", "4"])
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr
    assert "text prompt given but the model has no tokenizer" in proc.stderr


def test_request_over_max_length_is_a_clear_error(setup):
    model_dir, inp, _, _, work = setup
    proc = _run([sys.executable, GENERATE, "--model", str(model_dir), "--input", str(inp),
                 "--output", str(work / "y.jsonl"), "--max-tokens", "600"])
    assert proc.returncode == 2
    assert "exceeds the max model length 512" in proc.stderr


def test_bad_lines_fail_alone_and_fail_fast_runs_nothing(setup):
    model_dir, _, prompts, want, work = setup
    inp = work / "mixed.jsonl"
    inp.write_text("\n".join([json.dumps({"prompt_token_ids": prompts[0]}), "{not json",
                               json.dumps({"prompt_token_ids": prompts[1]}),
                               json.dumps({"prompt_token_ids": prompts[2], "max_tokens": 600}), "",
                               json.dumps({"prompt_token_ids": prompts[2]})]) + "\n")
    out = work / "mixed_out.jsonl"
    base = [sys.executable, GENERATE, "--model", str(model_dir), "--input", str(inp), "--output", str(out),
            "--max-tokens", "16", "--dtype", "float32", "--num-kv-blocks", "64"]
    proc = _run(base)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{inp}:2: not valid JSON" in proc.stderr
    assert f"{inp}:4: " in proc.stderr and "exceeds the max model length 512" in proc.stderr
    assert "2 of 5 input lines failed" in proc.stderr
    got = {o["index"]: o["token_ids"] for o in map(json.loads, out.read_text().splitlines())}
    assert got == {0: want[0], 2: want[1], 4: want[2]}  # indices count non-empty lines
    out.unlink()
    proc = _run(base + ["--fail-fast"])
    assert proc.returncode == 2 and f"{inp}:2: not valid JSON" in proc.stderr
    assert not out.exists() or out.read_text() == "", "nothing ran"


def test_a_killed_job_keeps_its_lines_and_resume_finishes_the_rest(setup, tmp_path):
    import os
    import signal
    import time

    model_dir = setup[0]
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (120,), generator=g)]
    inp = tmp_path / "many.jsonl"
    inp.write_text("".join(json.dumps({"prompt_token_ids": p, "ignore_eos": True}) + "\n" for p in prompts))
    args = ["--model", str(model_dir), "--input", str(inp), "--max-tokens", "48", "--dtype", "float32",
            "--num-kv-blocks", "128", "--max-num-seqs", "2"]
    calm = tmp_path / "calm.jsonl"
    assert _run([sys.executable, GENERATE, *args, "--output", str(calm)]).returncode == 0
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, GENERATE, *args, "--output", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 30:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = [json.loads(line) for line in out.read_text().split("\n")[:-1]]  # complete lines only
    assert 30 <= len(kept) < len(prompts)
    with open(out, "a") as f:  # as if the kill had cut a line in half
        f.write('{"index": 7, "prompt_tok')
    proc = _run([sys.executable, GENERATE, *args, "--output", str(out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[: len(kept)] == kept, "what the killed job wrote is kept as it was"
    assert sorted(o["index"] for o in lines) == list(range(len(prompts)))
    want = {o["index"]: o["token_ids"] for o in map(json.loads, calm.read_text().splitlines())}
    assert {o["index"]: o["token_ids"] for o in lines} == want
