"""Speculative decoding end to end at TP = 1 and 2: greedy output equals non-speculative output
token for token, with preemption and prefix caching active and the block-manager invariant checked
after every step; a draft equal to the target is accepted (almost) always."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tests.dist_harness import run_ranks, watch_scheduler
from tests.tiny_models import build_tiny_model

MAX_TOKENS = 20


def _rank(model_dir, draft_dir, method, num_blocks, prompts, policy):
    from tpserve.distributed import init_distributed
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.setup import EngineArgs, build_runtime
    from tpserve.engine.worker import run_worker
    from tpserve.server.offline import generate

    tp = init_distributed(device_type="cpu")
    args = EngineArgs(model=model_dir, dtype="float32", block_size=4, num_kv_blocks=num_blocks, max_num_seqs=16,
                      max_num_batched_tokens=128, speculative_method=method, draft_model=draft_dir,
                      num_speculative_tokens=3, spec_policy=policy)
    runner, engine = build_runtime(args, tp)
    if engine is None:
        run_worker(runner)
        return None
    preemptions = watch_scheduler(engine)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    # First half warms the prefix cache; the second half shares its prefixes.
    half = len(prompts) // 2
    results = generate(engine, prompts[:half], params) + generate(engine, prompts[half:], params)
    engine.block_manager.check_invariants([])
    stats = engine.stats()
    spec = engine.spec
    # Per-sequence state (speculation's included) must go with the sequences.
    leftover = engine.leftovers()
    engine.shutdown()
    return {"tokens": [r.token_ids for r in results], "cached": sum(r.num_cached_tokens for r in results),
            "preemptions": preemptions[0], "spec": asdict(stats.speculation) if stats.speculation else None,
            "in_use": stats.kv_blocks_in_use, "leftover": leftover,
            "pooled_trials": spec.controller.estimates.pooled_trials if spec is not None else 0}


@pytest.fixture(scope="module")
def setup(tiny_dir):
    target = str(build_tiny_model(tiny_dir, "llama_gqa"))
    other = tiny_dir / "draft_other"
    if not other.exists():
        other = build_tiny_model(tiny_dir / "draft_other_src", "llama_gqa", seed=1)
    g = torch.Generator().manual_seed(31)
    shared = torch.randint(3, 256, (18,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 12, (12,), generator=g)]
    return target, str(other), prompts


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2])
def test_greedy_speculation_is_lossless(setup, tp_size):
    target, other, prompts = setup
    base = run_ranks(tp_size, _rank, target, None, "none", 40, prompts, "fixed")
    assert base["preemptions"] > 0, "the KV budget should force preemption"
    configs = [("draft", other, "fixed"), ("draft", target, "adaptive"), ("ngram", None, "fixed"),
               ("ngram", None, "adaptive")]
    for method, draft, policy in configs:
        out = run_ranks(tp_size, _rank, target, draft, method, 40, prompts, policy)
        assert out["tokens"] == base["tokens"], f"{method} draft={draft} policy={policy} tp={tp_size}"
        assert out["cached"] > 0 and out["in_use"] == 0 and out["leftover"] == {}
        if method == "ngram" and policy == "adaptive":
            assert out["pooled_trials"] > 0, "shadow verifications should feed the acceptance estimate"
        else:
            assert out["spec"]["num_proposed_tokens"] > 0
        if draft == target:
            assert out["spec"]["acceptance_rate"] >= 0.98, out["spec"]
        print(f"\ntp={tp_size} {method} {policy}: {out['spec']}, preemptions {out['preemptions']}")
