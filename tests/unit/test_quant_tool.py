"""`python -m tpserve.quantize`: output layout, copied files, TP-size report and the errors, plus
the loader's view of quantised tensor names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import build_tiny_model
from tpserve.config import ConfigError, ModelConfig
from tpserve.distributed import TPGroup
from tpserve.models import build_model
from tpserve.quant.methods import quant_method_for
from tpserve.quantize import main, quantize_checkpoint
from tpserve.weights import CheckpointError, load_weights


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def bf16_model(tiny_dir):
    """The tiny GQA Llama stored in bfloat16, with a generation config and a tokenizer file."""
    src = build_tiny_model(tiny_dir, "llama_gqa")
    dst = tiny_dir / "llama_gqa_bf16"
    if not (dst / "config.json").is_file():
        dst.mkdir()
        save_file({n: t.to(torch.bfloat16) for n, t in _tensors(src).items()}, dst / "model.safetensors")
        config = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
        (dst / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
        (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return dst


def test_int4_output_layout_copies_and_tp_report(bf16_model, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["--model", str(bf16_model), "--method", "int4", "--group-size", "32", "--output", str(out),
                 "--max-shard-size", "30KB"]) == 0
    printed = capsys.readouterr().out
    assert "loads at tp sizes [1, 2]" in printed
    assert "not at tp_size=4: o_proj is row-parallel: K=64 split 4 ways gives 16 rows per rank" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "tpserve", "bits": 4, "group_size": 32, "sym": False}
    assert ModelConfig.from_dir(out).quantization == "int4-g32"
    for name in ("generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    src, got = _tensors(bf16_model), _tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and len(set(index["weight_map"].values())) > 1
    assert torch.equal(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert got["model.norm.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight" not in got
    q = "model.layers.1.self_attn.k_proj"
    assert got[f"{q}.qweight"].shape == (64 // 8, 16) and got[f"{q}.qweight"].dtype == torch.int32
    assert got[f"{q}.scales"].shape == (2, 16) and got[f"{q}.zeros"].dtype == torch.uint8

    # The loader knows the quantised names: a missing one is reported by name.
    del got[f"{q}.scales"]
    for f in out.glob("*.safetensors*"):
        f.unlink()
    save_file(got, out / "model.safetensors")
    cfg = ModelConfig.from_dir(out, "float32")
    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): \['{q}.scales'\]"):
        load_weights(build_model(cfg, TPGroup(), quant_method_for(cfg)), out, show_progress=False)


def test_unsupported_tp_size_refused_at_build(bf16_model, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(bf16_model, out, "int4", 32, log=lambda *_: None)
    cfg = ModelConfig.from_dir(out, "float32")
    with pytest.raises(ConfigError, match=r"int4-g32 checkpoint cannot run at tp_size=4: o_proj is row-parallel.*"
                                          r"supported tp sizes: \[1, 2\]"):
        build_model(cfg, TPGroup(tp_rank=0, tp_size=4), quant_method_for(cfg))


def test_partial_group_checkpoint_runs_at_tp1_only(bf16_model, tmp_path, capsys):
    """G=128 > K=64: one partial group per column; unsplit layers accept it, split ones cannot."""
    out = tmp_path / "g128"
    assert main(["--model", str(bf16_model), "--method", "int4", "--group-size", "128", "--output", str(out)]) == 0
    assert "loads at tp sizes [1]" in capsys.readouterr().out
    got = _tensors(out)
    assert got["model.layers.0.mlp.gate_proj.scales"].shape == (1, 128)
    assert got["model.layers.0.mlp.down_proj.qweight"].shape == (128 // 8, 64)
    assert got["model.layers.0.mlp.down_proj.scales"].shape == (1, 64)


def test_errors(bf16_model, tmp_path, capsys):
    assert main(["--model", str(bf16_model), "--method", "int4", "--group-size", "24", "--output",
                 str(tmp_path / "b")]) == 2
    assert "group_size=24 is not supported" in capsys.readouterr().err
    quantize_checkpoint(bf16_model, tmp_path / "c", "int8", log=lambda *_: None)
    assert main(["--model", str(tmp_path / "c"), "--method", "int8", "--output", str(tmp_path / "d")]) == 2
    assert "already quantised (int8)" in capsys.readouterr().err


def test_module_entry_point(bf16_model, tmp_path):
    out = tmp_path / "q8"
    proc = subprocess.run([sys.executable, "-m", "tpserve.quantize", "--model", str(bf16_model), "--method", "int8",
                           "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "loads at tp sizes [1, 2, 4, 8]" in proc.stdout
    got = _tensors(out)
    assert got["model.layers.0.self_attn.o_proj.qweight"].dtype == torch.int8
    assert got["model.layers.0.self_attn.o_proj.scales"].shape == (64,)
