"""Quantised checkpoints through the whole model at TP = 1 (in process) and TP = 2 (gloo ranks):
GPTQ (plain, act-order, v1/v2, sym/asym) and AWQ checkpoints built by the tests' own packers, and
`tpserve.quantize` int8 / int4 outputs (and, at TP 1, group sizes that leave a partial last
group), each against the float checkpoint holding its dequantised
weights. Both run in float32, so logits must agree to ~1e-4 relative."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.dist_harness import run_ranks
from tests.tiny_models import build_quantized_tiny, build_tiny_model, dequantize_int4_ragged

LOGIT_RTOL = 1e-4
GROUP = 32


def dequantized_copy(qdir, out):
    """Float checkpoint of a tpserve-format checkpoint: each projection's weight dequantised."""
    config = json.loads((qdir / "config.json").read_text())
    qc = config.pop("quantization_config")
    tensors = {}
    for f in sorted(qdir.glob("*.safetensors")):
        tensors.update(load_file(f))
    floats = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            if qc["bits"] == 8:
                w = t.float() * tensors[f"{prefix}.scales"].float()[:, None]
            else:
                w = dequantize_int4_ragged(t, tensors[f"{prefix}.scales"], tensors[f"{prefix}.zeros"],
                                           qc["group_size"])
            floats[f"{prefix}.weight"] = w.contiguous()
        elif leaf not in ("scales", "zeros"):
            floats[name] = t
    out.mkdir(exist_ok=True)
    save_file(floats, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def cases(tiny_dir):
    from tpserve.quantize import quantize_checkpoint

    built = {
        "gptq": build_quantized_tiny(tiny_dir, "llama_gqa", "gptq", GROUP),
        "gptq-act-sym": build_quantized_tiny(tiny_dir, "llama_mqa", "gptq", GROUP, sym=True, act_order=True),
        "gptq-act-v2": build_quantized_tiny(tiny_dir, "qwen2_bias", "gptq", GROUP, act_order=True, v2=True),
        "awq": build_quantized_tiny(tiny_dir, "qwen2_bias", "awq", GROUP),
    }
    for label, name, method, group, sym in (("int8", "llama_gqa", "int8", 0, False),
                                            ("int4", "qwen2_bias", "int4", GROUP, False),
                                            ("int4-sym-g16", "llama_mqa", "int4", 16, True)):
        qdir = tiny_dir / f"{name}-tool-{label}"
        if not (qdir / "config.json").is_file():
            quantize_checkpoint(build_tiny_model(tiny_dir, name), qdir, method, group, sym,
                                max_shard_size=40_000, log=lambda *_: None)
        built[label] = (qdir, dequantized_copy(qdir, tiny_dir / f"{name}-tool-{label}-deq"))
    return {label: (str(q), str(d)) for label, (q, d) in built.items()}


@pytest.fixture(scope="module")
def partial_group_cases(tiny_dir):
    """G=48 ends every K (64, 128) in a partial group: loadable only where K is not split (TP 1)."""
    from tpserve.quantize import quantize_checkpoint

    qdir = tiny_dir / "llama_gqa-tool-int4-g48"
    if not (qdir / "config.json").is_file():
        quantize_checkpoint(build_tiny_model(tiny_dir, "llama_gqa"), qdir, "int4", 48, log=lambda *_: None)
    built = {"gptq-act-g48": build_quantized_tiny(tiny_dir, "llama_gqa", "gptq", 48, act_order=True),
             "int4-g48": (qdir, dequantized_copy(qdir, tiny_dir / "llama_gqa-tool-int4-g48-deq"))}
    return {label: (str(q), str(d)) for label, (q, d) in built.items()}


SEQS = [[5, 17, 99, 3, 42, 7, 8, 120, 64, 33, 2, 11, 90], [200, 4, 4, 61, 13, 27, 150]]


def _logits(model_dir):
    """Teacher-forced logits [positions, vocab] of SEQS: a packed prefill with every position's
    logits, then three decode steps."""
    from tpserve.config import CacheConfig, ModelConfig
    from tpserve.distributed import init_distributed
    from tpserve.engine.model_runner import ModelRunner
    from tpserve.engine.step import SeqWork, StepPlan
    from tpserve.engine.worker import Driver, run_worker

    tp = init_distributed(device_type="cpu")
    cfg = ModelConfig.from_dir(model_dir, "float32")
    runner = ModelRunner(cfg, CacheConfig(block_size=4, num_blocks=16), tp, model_dir, show_progress=False)
    if not tp.is_first:
        run_worker(runner)
        return None
    driver = Driver(runner)
    tables = [[1, 2, 3, 4], [5, 6, 7, 8]]
    rows = [driver.step(StepPlan([SeqWork(i, s[:-3], 0, tables[i], num_logits=len(s) - 3)
                                  for i, s in enumerate(SEQS)]))]
    for pos in (-3, -2, -1):
        rows.append(driver.step(StepPlan([SeqWork(i, [s[pos]], len(s) + pos, tables[i])
                                          for i, s in enumerate(SEQS)])))
    driver.shutdown()
    return {"logits": torch.cat(rows), "quantization": cfg.quantization}


def _all(jobs):
    return [(_logits(q), _logits(d)) for q, d in jobs]


def _check(cases, results, tp_size):
    for label, (quant, ref) in zip(cases, results):
        assert quant["quantization"] != "none" and ref["quantization"] == "none"
        rel = float((quant["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max())
        print(f"{label} tp={tp_size} ({quant['quantization']}): max relative logit error {rel:.2e}")
        assert rel <= LOGIT_RTOL, f"{label} tp={tp_size}: relative logit error {rel:.2e}"


def test_quantised_checkpoints_tp1(cases, partial_group_cases):
    cases = {**cases, **partial_group_cases}
    _check(cases, _all(list(cases.values())), 1)


@pytest.mark.slow
def test_quantised_checkpoints_tp2(cases):
    _check(cases, run_ranks(2, _all, list(cases.values())), 2)
