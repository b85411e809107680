"""Prompt log-probabilities from the engine's prefill (the OpenAI `echo` + `logprobs` path that
evaluation harnesses score texts with) equal transformers' teacher-forced log_softmax, at TP 1
and 2, on a model whose vocabulary (203) does not divide by the TP size, with chunked prefill and a
prompt seen twice (a prefix-cache hit must not skip scoring)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.tiny_models import build_tiny_model, load_hf

TOP = 3


def _rank(model_dir, prompts):
    from tpserve.distributed import init_distributed
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.engine.worker import run_worker
    from tpserve.server.offline import generate

    tp = init_distributed(device_type="cpu")
    args = EngineArgs(model=model_dir, dtype="float32", block_size=4, num_kv_blocks=128, max_num_batched_tokens=16)
    runner, engine = build_runtime(args, tp)
    if engine is None:
        run_worker(runner)
        return None
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=TOP)
    generating = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP)
    # The same prompts twice: the second pass would hit the prefix cache.
    results = generate(engine, prompts, scoring) + generate(engine, prompts[:1], generating)
    leftovers = engine.leftovers()
    engine.shutdown()
    return {"prompt_logprobs": [[None if lp is None else (lp.token_id, lp.logprob, lp.top) for lp in r.prompt_logprobs]
                                for r in results],
            "tokens": [r.token_ids for r in results], "finish": [r.finish_reason for r in results],
            "leftovers": leftovers}


@pytest.fixture(scope="module")
def setup(tiny_dir):
    model_dir = build_tiny_model(tiny_dir, "llama_mha_tied_oddvocab")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 203, (n,), generator=g).tolist() for n in (1, 2, 9, 37)]
    hf = load_hf(model_dir)
    with torch.no_grad():
        want = [hf(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long)).logits[0].log_softmax(-1)
                for p in prompts]
    return str(model_dir), prompts, want


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2])
def test_prompt_logprobs_equal_teacher_forced_log_softmax(setup, tp_size):
    model_dir, prompts, want = setup
    out = run_ranks(tp_size, _rank, model_dir, prompts + prompts)
    assert out["leftovers"] == {}
    assert out["finish"] == ["length"] * (2 * len(prompts) + 1)
    assert out["tokens"][: 2 * len(prompts)] == [[]] * (2 * len(prompts)) and len(out["tokens"][-1]) == 4
    worst = 0.0
    for i, got in enumerate(out["prompt_logprobs"]):
        prompt, ref = (prompts + prompts + prompts[:1])[i], want[i % len(prompts)]
        assert len(got) == len(prompt) and got[0] is None
        for pos in range(1, len(prompt)):
            token, logprob, top = got[pos]
            assert token == prompt[pos]
            worst = max(worst, abs(logprob - float(ref[pos - 1, token])))
            ref_top = ref[pos - 1].topk(TOP)
            assert [t for t, _ in top] == ref_top.indices.tolist()
            assert max(abs(v - r) for (_, v), r in zip(top, ref_top.values.tolist())) < 1e-4
    assert worst < 1e-4, worst
    print(f"\ntp={tp_size}: largest prompt-logprob difference from transformers {worst:.2e}")
