"""Config parsing (both transformers spellings) and the loader's errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import build_tiny_model
from tpserve.config import CacheConfig, ConfigError, ModelConfig
from tpserve.distributed import TPGroup
from tpserve.models import build_model
from tpserve.weights import CheckpointError, load_weights

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
}


def test_old_and_new_rope_spellings_agree():
    new = ModelConfig.from_hf({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}, "dtype": "bfloat16"})
    old = ModelConfig.from_hf({**LLAMA, "rope_theta": 5e5, "torch_dtype": "bfloat16", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}})
    assert new.rope == old.rope and new.rope.theta == 5e5 and new.rope.rope_type == "llama3"
    assert new.dtype == old.dtype == torch.bfloat16
    assert ModelConfig.from_hf(LLAMA, "float16").dtype == torch.float16


def test_unsupported_architecture_and_rope_named():
    with pytest.raises(ConfigError, match="'GPT2LMHeadModel' is not supported"):
        ModelConfig.from_hf({**LLAMA, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        ModelConfig.from_hf(LLAMA, "int8")


@pytest.mark.parametrize("tp_size,msg", [(3, "tp_size=3 does not divide num_attention_heads=4"),
                                         (8, "tp_size=8 does not divide num_attention_heads=4")])
def test_heads_not_divisible(tp_size, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_hf(LLAMA).check_tp(tp_size)


def test_cache_config_limits():
    with pytest.raises(ConfigError, match="block_size=24"):
        CacheConfig(block_size=24)
    with pytest.raises(ConfigError, match="num_kv_blocks=0"):
        CacheConfig(num_blocks=0)


@pytest.fixture
def single_file_model(tiny_dir, tmp_path):
    src = build_tiny_model(tiny_dir, "llama_gqa")
    dst = tmp_path / "model"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file(tensors, dst / "model.safetensors")
    return dst, tensors


def _model(model_dir):
    return build_model(ModelConfig.from_dir(model_dir, "float32"), TPGroup())


def test_single_file_checkpoint_loads(single_file_model):
    model_dir, tensors = single_file_model
    model = _model(model_dir)
    load_weights(model, model_dir, show_progress=False)
    torch.testing.assert_close(model.model.norm.weight, tensors["model.norm.weight"])


def test_missing_tensor_named(single_file_model):
    model_dir, tensors = single_file_model
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): \['model.layers.1.mlp.up_proj.weight'\]"):
        load_weights(_model(model_dir), model_dir, show_progress=False)


def test_unexpected_tensor_named(single_file_model):
    model_dir, tensors = single_file_model
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors.*self_attn.extra.weight"):
        load_weights(_model(model_dir), model_dir, show_progress=False)


def test_pickle_checkpoint_refused(single_file_model):
    model_dir, tensors = single_file_model
    (model_dir / "model.safetensors").unlink()
    torch.save(tensors, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle checkpoints \['pytorch_model.bin'\].*Convert"):
        load_weights(_model(model_dir), model_dir, show_progress=False)


def test_index_naming_absent_shard(tiny_dir, tmp_path):
    src = build_tiny_model(tiny_dir, "llama_gqa")
    dst = shutil.copytree(src, tmp_path / "m")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (dst / first).unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: \\['{first}'\\]"):
        load_weights(_model(dst), dst, show_progress=False)


def test_only_own_slice_is_read(tiny_dir):
    """A rank's weights hold exactly its slice: rank 1 of 2 gets the second half of q heads."""
    model_dir = build_tiny_model(tiny_dir, "llama_gqa")
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))

    class Rank1(TPGroup):
        def all_reduce(self, x):
            return x

    model = build_model(ModelConfig.from_dir(model_dir, "float32"), Rank1(tp_rank=1, tp_size=2))
    load_weights(model, model_dir, show_progress=False)
    qkv = model.model.layers[0].self_attn.qkv_proj
    wq = tensors["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(qkv.weight[: qkv.q_size], wq[wq.shape[0] // 2 :])
    assert model.lm_head.weight.shape[0] == 128
