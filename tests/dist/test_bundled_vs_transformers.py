"""The bundled target through tpserve (TP = 1 and 2, float32) gives transformers' greedy output."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tpserve.bundled import DEFAULT_MODEL_DIR

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(root):\n", "class Stack:\n    def __init__(self):\n"]
NEW_TOKENS = 32

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(),
                                reason=f"bundled model not built in {DEFAULT_MODEL_DIR}")


def _rank(prompts):
    from tpserve.distributed import init_distributed
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.engine.worker import run_worker
    from tpserve.server.offline import generate

    tp = init_distributed(device_type="cpu")
    runner, engine = build_runtime(EngineArgs(model=str(DEFAULT_MODEL_DIR), dtype="float32", num_kv_blocks=64), tp)
    if engine is None:
        run_worker(runner)
        return None
    out = generate(engine, prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    engine.shutdown()
    return [(r.prompt_token_ids, r.token_ids, r.text) for r in out]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    hf = AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
            refs.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    return tok, refs


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2])
def test_bundled_target_matches_transformers(reference, tp_size):
    tok, refs = reference
    got = run_ranks(tp_size, _rank, PROMPTS)
    for (prompt_ids, tokens, text), (ref_prompt, ref_tokens) in zip(got, refs):
        assert prompt_ids == ref_prompt
        assert tokens == ref_tokens
        assert text == tok.decode(ref_tokens, skip_special_tokens=True)
