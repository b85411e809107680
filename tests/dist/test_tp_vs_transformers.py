"""Tensor-parallel forward (TP = 1, 2, 4 over gloo) against transformers, the oracle.

Checks float32 logits of chunked prefill and decode steps for a packed batch of sequences, and
greedy continuations of 32 tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.tiny_models import TINY_MODELS, build_tiny_model, load_hf

LOGIT_RTOL = 1e-4
PROMPT_LENS = (3, 9, 17, 30)
SEQ_LEN = 40  # teacher-forced tokens per sequence for the logits check
GEN_TOKENS = 32


def _rank_main(model_dir, seqs, prompts):
    from tpserve.config import CacheConfig, ModelConfig
    from tpserve.distributed import init_distributed
    from tpserve.engine.model_runner import ModelRunner
    from tpserve.engine.engine import LLMEngine
    from tpserve.engine.sampling_params import SamplingParams
    from tpserve.engine.scheduler import SchedulerConfig
    from tpserve.engine.step import SeqWork, StepPlan
    from tpserve.engine.worker import Driver, run_worker
    from tpserve.server.offline import generate

    tp = init_distributed(device_type="cpu")
    cfg = ModelConfig.from_dir(model_dir, "float32")
    runner = ModelRunner(cfg, CacheConfig(block_size=4, num_blocks=160), tp, model_dir, show_progress=False)
    if not tp.is_first:
        run_worker(runner)
        return None
    driver = Driver(runner)
    # Teacher-forced logits: every sequence prefills in two chunks (the second attends to the
    # first through the cache), then decodes the rest one token per step, all packed together.
    tables = [list(range(i * 12 + 1, i * 12 + 13)) for i in range(len(seqs))]
    split = [(len(s) - 10) // 2 for s in seqs]
    logits = [[] for _ in seqs]
    plan = StepPlan([SeqWork(i, s[: split[i]], 0, tables[i]) for i, s in enumerate(seqs)])
    for i, row in enumerate(driver.step(plan)):
        logits[i].append(row)
    plan = StepPlan([SeqWork(i, s[split[i] : len(s) - 10], split[i], tables[i]) for i, s in enumerate(seqs)])
    for i, row in enumerate(driver.step(plan)):
        logits[i].append(row)
    for pos in range(-10, 0):
        plan = StepPlan([SeqWork(i, [s[pos]], len(s) + pos, tables[i]) for i, s in enumerate(seqs)])
        for i, row in enumerate(driver.step(plan)):
            logits[i].append(row)
    # The tables above were sent in full each step; drop them before the engine reuses blocks.
    driver.step(StepPlan(finished=list(range(len(seqs)))))
    engine = LLMEngine(driver, cfg.vocab_size, runner.num_blocks, runner.block_size,
                       SchedulerConfig(max_model_len=cfg.max_position_embeddings), eos_token_ids=cfg.eos_token_ids)
    results = generate(engine, prompts, SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0))
    driver.shutdown()
    return {
        "logits": [torch.stack(rows) for rows in logits],
        "split": split,
        "generated": [r.token_ids for r in results],
    }


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Per model: directory, inputs and the transformers outputs for them."""
    cache = {}

    def get(name):
        if name not in cache:
            model_dir = build_tiny_model(tiny_dir, name)
            hf = load_hf(model_dir)
            vocab = hf.config.vocab_size
            g = torch.Generator().manual_seed(1)
            seqs = [torch.randint(3, vocab, (SEQ_LEN - 7 * i,), generator=g).tolist() for i in range(3)]
            prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
            with torch.no_grad():
                ref_logits = [hf(torch.tensor([s])).logits[0] for s in seqs]
                ref_gen = []
                for p in prompts:
                    out = hf.generate(torch.tensor([p]), max_new_tokens=GEN_TOKENS, do_sample=False,
                                      eos_token_id=hf.config.eos_token_id, pad_token_id=0)
                    ref_gen.append(out[0, len(p):].tolist())
            cache[name] = (model_dir, seqs, prompts, ref_logits, ref_gen)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def tp_outputs(reference):
    """One launch of `tp_size` ranks runs every tiny model (process start-up dominates)."""
    cache = {}

    def get(tp_size):
        if tp_size not in cache:
            jobs = [(str(reference(n)[0]), reference(n)[1], reference(n)[2]) for n in sorted(TINY_MODELS)]
            outs = run_ranks(tp_size, _rank_main_all, jobs)
            cache[tp_size] = dict(zip(sorted(TINY_MODELS), outs))
        return cache[tp_size]

    return get


def _rank_main_all(jobs):
    return [_rank_main(*job) for job in jobs]


@pytest.mark.slow
@pytest.mark.parametrize("tp_size", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tp_matches_transformers(reference, tp_outputs, name, tp_size, record_property):
    model_dir, seqs, prompts, ref_logits, ref_gen = reference(name)
    out = tp_outputs(tp_size)[name]
    worst = 0.0
    for i, seq in enumerate(seqs):
        # Rows: end of chunk 1, end of chunk 2, then each of the 10 decode positions.
        positions = [out["split"][i] - 1, len(seq) - 11] + list(range(len(seq) - 10, len(seq)))
        want = ref_logits[i][positions]
        got = out["logits"][i]
        rel = float((got - want).abs().max() / want.abs().max())
        worst = max(worst, rel)
        assert rel <= LOGIT_RTOL, f"{name} tp={tp_size} seq {i}: relative logit error {rel:.2e}"
    record_property("max_rel_logit_err", worst)
    print(f"\n{name} tp={tp_size}: max relative logit error {worst:.3e}")
    for p, got, want in zip(prompts, out["generated"], ref_gen):
        assert got == want, f"{name} tp={tp_size} prompt len {len(p)}: greedy output differs"
