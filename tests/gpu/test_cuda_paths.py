"""CUDA-only checks (skipped without a GPU): the Triton kernels in bf16, which the CPU interpreter
cannot check, against the torch references, and the whole model on the GPU against transformers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda


def test_quantised_matmuls_bf16():
    from tpserve.ops.dispatch import use_backend, w4a16_matmul, w8a16_matmul
    from tpserve.ops.quant import quantize_int4, quantize_int8

    g = torch.Generator(device="cuda").manual_seed(0)
    for m in (1, 17, 129, 512):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(1376, 4096, device="cuda", generator=g) * 0.02
        q8, s8 = quantize_int8(w)
        q4, s4, z4 = quantize_int4(w, 128)
        for fn, args in ((w8a16_matmul, (q8, s8)), (w4a16_matmul, (q4, s4, z4, 128))):
            with use_backend("triton"):
                got = fn(x, *args)
            with use_backend("torch"):
                ref = fn(x, *args)
            torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=2e-2)


def test_model_on_gpu_matches_transformers_and_reference():
    from tests.tiny_models import load_hf
    from tpserve.bundled import DEFAULT_MODEL_DIR
    from tpserve.config import CacheConfig, ModelConfig
    from tpserve.distributed import TPGroup
    from tpserve.engine.model_runner import ModelRunner
    from tpserve.engine.step import SeqWork, StepPlan
    from tpserve.ops.dispatch import use_backend

    model_dir = DEFAULT_MODEL_DIR  # head_dim 32: the kernels' tl.dot needs dimensions >= 16
    cfg = ModelConfig.from_dir(model_dir, "float32")
    ids = torch.randint(3, 4096, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = load_hf(model_dir)(torch.tensor([ids])).logits[0, 29:40]

    def run(backend):
        runner = ModelRunner(cfg, CacheConfig(block_size=16, num_blocks=8), TPGroup(device=torch.device("cuda", 0)),
                             model_dir, show_progress=False)
        with use_backend(backend):
            rows = [runner.execute(StepPlan([SeqWork(0, ids[:30], 0, block_table=[5, 1, 3])]))]
            for p in range(30, 40):
                rows.append(runner.execute(StepPlan([SeqWork(0, [ids[p]], p, block_table=[5, 1, 3])])))
        return torch.cat(rows).cpu()

    for backend in ("triton", "torch"):
        got = run(backend)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-3, backend
