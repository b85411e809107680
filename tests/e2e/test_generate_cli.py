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
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [o["index"] for o in lines] == list(range(len(prompts)))
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
