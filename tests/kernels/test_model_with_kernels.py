"""The whole model with the Triton attention kernels (interpreter on CPU) equals the reference
path: proves the kernels are wired into the layers, for prefill, chunked prefill and decode."""

from __future__ import annotations

import torch

from tests.tiny_models import build_tiny_model
from tpserve.config import CacheConfig, ModelConfig
from tpserve.distributed import TPGroup
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.step import SeqWork, StepPlan
from tpserve.ops.dispatch import use_backend


def test_triton_backend_matches_reference(tiny_dir):
    model_dir = build_tiny_model(tiny_dir, "mistral_swa")
    cfg = ModelConfig.from_dir(model_dir, "float32")
    ids = torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(backend):
        runner = ModelRunner(cfg, CacheConfig(block_size=4, num_blocks=16), TPGroup(), model_dir, show_progress=False)
        for k, v in runner.kv_caches:  # unused slots poisoned: they must never be read
            k.fill_(float("nan"))
            v.fill_(float("nan"))
        table = [9, 3, 14, 0, 7, 11, 2]
        with use_backend(backend):
            rows = [runner.execute(StepPlan([SeqWork(0, ids[:10], 0, block_table=table)]))]
            rows.append(runner.execute(StepPlan([SeqWork(0, ids[10:20], 10, block_table=table)])))
            for p in range(20, 24):
                rows.append(runner.execute(StepPlan([SeqWork(0, [ids[p]], p, block_table=table)])))
        return torch.cat(rows)

    ref, got = run("torch"), run("triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
