"""The engine end to end at TP = 1 and 2: continuous batching under a KV budget small enough to
force preemption gives transformers' greedy outputs; prefix-cache hits report the expected cached
token counts and change nothing in the output."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tests.dist_harness import run_ranks, watch_scheduler
from tests.tiny_models import build_tiny_model, load_hf

NUM_PROMPTS = 64
MAX_TOKENS = 12
BLOCK = 4
PREFIX = 37  # shared prefix length; not a multiple of the block size


def _engine_rank(model_dir, num_blocks, caching, jobs):
    """jobs: list of batches; each batch is a list of prompts run to completion together."""
    from tpserve.distributed import init_distributed
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.engine.worker import run_worker
    from tpserve.server.offline import generate

    tp = init_distributed(device_type="cpu")
    args = EngineArgs(model=model_dir, dtype="float32", block_size=BLOCK, num_kv_blocks=num_blocks,
                      max_num_seqs=32, max_num_batched_tokens=96, enable_prefix_caching=caching)
    runner, engine = build_runtime(args, tp)
    if engine is None:
        run_worker(runner)
        return None
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    results = []
    preemptions = watch_scheduler(engine)
    for batch in jobs:
        results.append([(r.token_ids, r.num_cached_tokens) for r in generate(engine, batch, params)])
    stats, leftovers = asdict(engine.stats()), engine.leftovers()
    engine.shutdown()
    return {"results": results, "preemptions": preemptions[0], "stats": stats, "leftovers": leftovers}


@pytest.fixture(scope="module")
def model(tiny_dir):
    model_dir = build_tiny_model(tiny_dir, "llama_gqa")
    return str(model_dir), load_hf(model_dir)


def hf_greedy(hf, prompts):
    out = []
    with torch.no_grad():
        for p in prompts:
            gen = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2])
def test_many_prompts_with_preemption_match_transformers(model, tp_size):
    model_dir, hf = model
    g = torch.Generator().manual_seed(11)
    lengths = [int(x) for x in torch.randint(1, 40, (NUM_PROMPTS,), generator=g)]
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    want = hf_greedy(hf, prompts)
    # 40 blocks of 4 tokens = 160 tokens: far less than the 64 prompts need together.
    out = run_ranks(tp_size, _engine_rank, model_dir, 40, True, [prompts])
    got = [tokens for tokens, _ in out["results"][0]]
    assert out["preemptions"] > 0, "the KV budget should have forced preemption"
    mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not mismatched, f"tp={tp_size}: outputs differ from transformers for prompts {mismatched}"
    assert out["stats"]["kv_blocks_in_use"] == 0
    assert out["leftovers"] == {}, "finished requests must leave nothing in the engine"
    print(f"\ntp={tp_size}: {out['preemptions']} preemptions, outputs identical for {NUM_PROMPTS} prompts")


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2])
def test_shared_prefix_hits_and_same_output(model, tp_size):
    model_dir, hf = model
    g = torch.Generator().manual_seed(12)
    prefix = torch.randint(3, 256, (PREFIX,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 256, (5 + i,), generator=g).tolist() for i in range(6)]
    jobs = [prompts[:1], prompts[1:]]  # the first request fills the cache, the rest hit it
    with_cache = run_ranks(tp_size, _engine_rank, model_dir, 200, True, jobs)
    without = run_ranks(tp_size, _engine_rank, model_dir, 200, False, jobs)
    cached = [c for batch in with_cache["results"] for _, c in batch]
    assert cached == [0] + [(PREFIX // BLOCK) * BLOCK] * 5
    assert all(c == 0 for batch in without["results"] for _, c in batch)
    tokens_with = [t for batch in with_cache["results"] for t, _ in batch]
    tokens_without = [t for batch in without["results"] for t, _ in batch]
    assert tokens_with == tokens_without == hf_greedy(hf, prompts)
    assert with_cache["stats"]["prefix_cache_hit_rate"] > 0
