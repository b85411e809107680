"""GPTQ / AWQ / tpserve quantised tensors, built by the test's own packers (tests/tiny_models.py),
loaded into sharded layers: every rank's layer must apply exactly the dequantised float weight.

The effective weight of a layer is read back as layer(I): with an identity input every output is
a single product, so quantised and float layers must agree bit for bit (act-order permutations and
padding included)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import awq_tensors, dequantize_int4_ragged, gptq_tensors
from tpserve.config import ConfigError
from tests.dist_harness import LocalGroup, local_ranks
from tpserve.distributed import TPGroup
from tpserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tpserve.layers.sources import InMemorySource
from tpserve.ops.quant import dequantize_int4, quantize_int8
from tpserve.quant.config import QuantConfig
from tpserve.quant.formats import QuantFormatError
from tpserve.quant.methods import get_quant_method
from tpserve.quantize import quantize_tensor


def method(**qc):
    return get_quant_method(QuantConfig.from_hf({"quantization_config": qc}))


def gptq(group, sym=False, act=False, v2=False):
    return method(quant_method="gptq", bits=4, group_size=group, sym=sym, desc_act=act,
                  checkpoint_format="gptq_v2" if v2 else "gptq")


def load(layer, tensors: dict, shard_id=None, prefix="w"):
    for suffix, t in tensors.items():
        layer.load_checkpoint_tensor(suffix, InMemorySource(f"{prefix}.{suffix}", t), shard_id)
    layer.finish_loading() if shard_id is None else None


def effective(layer) -> torch.Tensor:
    """The [N_l, K_l] float weight the layer applies."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features)).t()


def random_g_idx(k, group, seed):
    return (torch.arange(k) // group)[torch.randperm(k, generator=torch.Generator().manual_seed(seed))]


GPTQ_CASES = [  # (sym, act_order, v2)
    (False, False, False), (True, False, True), (False, True, False), (True, True, False), (False, True, True),
]


@pytest.mark.parametrize("sym,act,v2", GPTQ_CASES)
@pytest.mark.parametrize("num_kv,tp_size", [(2, 1), (2, 2), (2, 4), (4, 2)])
def test_gptq_qkv_matches_dequantised(sym, act, v2, num_kv, tp_size):
    # head_dim 4: a replicated kv head can start mid-way through an 8-column qzeros block.
    heads, head_dim, hidden, group = 8, 4, 32, 16
    torch.manual_seed(0)
    g_idx = random_g_idx(hidden, group, 1) if act else None  # q, k, v share their input's g_idx
    packed, deq = {}, {}
    for shard, n in (("q", heads * head_dim), ("k", num_kv * head_dim), ("v", num_kv * head_dim)):
        packed[shard], deq[shard] = gptq_tensors(torch.randn(n, hidden), group, sym, g_idx, v2)
    for tp in local_ranks(tp_size):
        ql = QKVParallelLinear(hidden, head_dim, heads, num_kv, False, tp, torch.float32, gptq(group, sym, act, v2))
        fl = QKVParallelLinear(hidden, head_dim, heads, num_kv, False, tp, torch.float32)
        for shard in ("q", "k", "v"):
            load(ql, packed[shard], shard, prefix=f"{shard}_proj")
            fl.load_checkpoint_tensor("weight", InMemorySource(shard, deq[shard]), shard)
        ql.finish_loading()
        assert torch.equal(effective(ql), fl.weight)
        if not act:
            assert torch.equal(dequantize_int4(ql.qweight, ql.scales, ql.zeros, group), fl.weight)


@pytest.mark.parametrize("fmt", ["gptq", "gptq-act", "awq", "tpserve"])
@pytest.mark.parametrize("hidden,tp_size", [(64, 1), (64, 2), (80, 2)])
def test_merged_gate_up_matches_dequantised(fmt, hidden, tp_size):
    inter, group = 48, 32  # hidden 80: a partial last group of 16 rows
    torch.manual_seed(1)
    g_idx = random_g_idx(hidden, group, 2)
    parts = []
    for _ in range(2):
        w = torch.randn(inter, hidden)
        if fmt == "awq":
            parts.append(awq_tensors(w, group))
        elif fmt == "tpserve":
            t = {n.removeprefix("w."): v for n, v in quantize_tensor("w.weight", w, "int4", group, False).items()}
            parts.append((t, dequantize_int4_ragged(t["qweight"], t["scales"], t["zeros"], group)))
        else:
            parts.append(gptq_tensors(w, group, False, g_idx if fmt == "gptq-act" else None))
    quant = {"gptq": gptq(group), "gptq-act": gptq(group, act=True),
             "awq": method(quant_method="awq", bits=4, group_size=group, zero_point=True, version="GEMM"),
             "tpserve": method(quant_method="tpserve", bits=4, group_size=group)}[fmt]
    for tp in local_ranks(tp_size):
        ql = MergedColumnParallelLinear(hidden, [inter, inter], True, tp, torch.float32, quant)
        fl = MergedColumnParallelLinear(hidden, [inter, inter], True, tp, torch.float32)
        for shard, (tensors, w_deq) in enumerate(parts):
            bias = torch.randn(inter)
            load(ql, {**tensors, "bias": bias}, shard)
            fl.load_checkpoint_tensor("weight", InMemorySource("w", w_deq), shard)
            fl.load_checkpoint_tensor("bias", InMemorySource("b", bias), shard)
        ql.finish_loading()
        x = torch.randn(5, hidden)
        torch.testing.assert_close(ql(x), fl(x), rtol=1e-5, atol=1e-5)
        ql.bias, fl.bias = None, None
        assert torch.equal(effective(ql), fl.weight)


ROW_FORMATS = ["gptq-asym", "gptq-sym-v2", "gptq-act", "gptq-act-sym-v2", "awq", "tpserve", "tpserve-sym"]


def _row_tensors(fmt, w, group, seed):
    if fmt.startswith("gptq"):
        g_idx = random_g_idx(w.shape[1], group, seed) if "act" in fmt else None
        return gptq_tensors(w, group, "sym" in fmt, g_idx, "v2" in fmt), gptq(group, "sym" in fmt, "act" in fmt,
                                                                                "v2" in fmt)
    if fmt == "awq":
        return awq_tensors(w, group), method(quant_method="awq", bits=4, group_size=group)
    t = quantize_tensor("w.weight", w, "int4", group, fmt.endswith("sym"))
    t = {name.removeprefix("w."): v for name, v in t.items()}
    return ((t, dequantize_int4_ragged(t["qweight"], t["scales"], t["zeros"], group)),
            method(quant_method="tpserve", bits=4, group_size=group, sym=fmt.endswith("sym")))


# K=80, G=32: the last group has 16 rows. K=96 at TP 2: 48-row shards cut 32-row groups, which
# only act-order (padded per group) accepts.
ROW_CASES = [(fmt, *shape) for fmt in ROW_FORMATS for shape in ((64, 16, 1), (64, 16, 2), (64, 16, 4), (80, 32, 1))]
ROW_CASES += [(fmt, 96, 32, 2) for fmt in ROW_FORMATS if "act" in fmt]


@pytest.mark.parametrize("fmt,k,group,tp_size", ROW_CASES)
def test_row_parallel_matches_dequantised(fmt, k, group, tp_size):
    n = 24
    torch.manual_seed(2)
    (tensors, w_deq), quant = _row_tensors(fmt, torch.randn(n, k), group, seed=3)
    slices, padded = [], []
    for tp in local_ranks(tp_size):
        layer = RowParallelLinear(k, n, False, tp, torch.float32, quant)
        load(layer, tensors)
        slices.append(effective(layer))
        padded.append(layer.act_pad)
        if "act" not in fmt:
            groups = -(-k // tp_size // group)
            assert layer.qweight.shape == (groups * group // 8, n) and layer.scales.shape == (groups, n)
            assert layer.k_pad == groups * group - k // tp_size
    assert torch.equal(torch.cat(slices, dim=1), w_deq)
    # A random g_idx scatters each group over all ranks: K/tp-row shards must be padded, and so
    # must a partial last group.
    assert any(padded) == ("act" in fmt and (tp_size > 1 or k % group > 0))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_int8_column_and_row(tp_size):
    torch.manual_seed(3)
    w1, w2 = torch.randn(32, 16), torch.randn(16, 32)
    quant = method(quant_method="tpserve", bits=8)
    (q1, s1), (q2, s2) = quantize_int8(w1), quantize_int8(w2)
    d1, d2 = q1.float() * s1[:, None], q2.float() * s2[:, None]
    cols, rows = [], []
    for tp in local_ranks(tp_size):
        col = ColumnParallelLinear(16, 32, False, tp, torch.float32, quant)
        row = RowParallelLinear(32, 16, False, tp, torch.float32, quant)
        load(col, {"qweight": q1, "scales": s1}), load(row, {"qweight": q2, "scales": s2})
        cols.append(effective(col))
        rows.append(effective(row))
    assert torch.equal(torch.cat(cols, 0), d1) and torch.equal(torch.cat(rows, 1), d2)


def test_row_shard_cutting_a_group_is_refused():
    with pytest.raises(ConfigError, match=r"K=64 input features split 4 ways holds 16 rows per rank, not a "
                                          r"multiple of 32: a shard would cut a quantisation group of 32 rows"):
        RowParallelLinear(64, 24, False, LocalGroup(tp_rank=0, tp_size=4), torch.float32, gptq(32))
    # Act-order rows are padded per group, so only the 8-row packing limits the split.
    RowParallelLinear(64, 24, False, LocalGroup(tp_rank=0, tp_size=4), torch.float32, gptq(32, act=True))
    with pytest.raises(ConfigError, match="cut the 8-row int32 packing"):
        RowParallelLinear(64, 24, False, LocalGroup(tp_rank=0, tp_size=16), torch.float32, gptq(32, act=True))


def test_fused_shards_with_different_g_idx_refused():
    torch.manual_seed(4)
    layer = MergedColumnParallelLinear(32, [16, 16], False, TPGroup(), torch.float32, gptq(16, act=True))
    load(layer, gptq_tensors(torch.randn(16, 32), 16, False, random_g_idx(32, 16, 0))[0], 0)
    with pytest.raises(QuantFormatError, match="must share one g_idx"):
        load(layer, gptq_tensors(torch.randn(16, 32), 16, False, random_g_idx(32, 16, 1))[0], 1)


def test_act_order_g_idx_without_desc_act_refused():
    torch.manual_seed(5)
    layer = ColumnParallelLinear(32, 16, False, TPGroup(), torch.float32, gptq(16))
    with pytest.raises(QuantFormatError, match="desc_act is false"):
        load(layer, gptq_tensors(torch.randn(16, 32), 16, False, random_g_idx(32, 16, 0))[0])


@pytest.mark.parametrize("qc,msg", [
    ({"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes' is not supported; supported: \['tpserve'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"gptq bits=8 is not supported; supported: \[4\]"),
    ({"quant_method": "tpserve", "bits": 3}, r"tpserve bits=3 is not supported; supported: \[8, 4\]"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, "group_size=100 is not supported; it must be a "
                                                              "positive multiple of 16"),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size=-1 .* not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format='marlin' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "lm_head=true"),
    ({"quant_method": "tpserve", "bits": 8, "group_size": 128}, "int8 is per output channel"),
])
def test_config_errors_name_value_and_limit(qc, msg):
    with pytest.raises(ConfigError, match=msg):
        QuantConfig.from_hf({"quantization_config": qc})


def test_config_names():
    def name(**qc):
        return QuantConfig.from_hf({"quantization_config": qc}).name

    assert QuantConfig.from_hf({}) is None
    assert name(quant_method="tpserve", bits=8) == "int8"
    assert name(quant_method="tpserve", bits=4, group_size=128, sym=True) == "int4-g128"
    assert name(quant_method="gptq", bits=4, group_size=128, desc_act=True) == "gptq-4bit-g128"
    assert name(quant_method="awq", bits=4, group_size=64, zero_point=True, version="gemm") == "awq-4bit-g64"


def test_gptq_zero_bias_of_biasless_layer_accepted_nonzero_refused(tiny_dir, tmp_path):
    """GPTQ exporters may store all-zero biases for layers without one: read, checked, dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.tiny_models import build_quantized_tiny
    from tpserve.config import ModelConfig
    from tpserve.models import build_model
    from tpserve.quant.methods import quant_method_for
    from tpserve.weights import CheckpointError, load_weights

    qdir, _ = build_quantized_tiny(tiny_dir, "llama_gqa", "gptq", 32)
    tensors = {}
    for f in sorted(qdir.glob("*.safetensors")):
        tensors.update(load_file(f))
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(qdir / "config.json", model_dir)
    cfg = ModelConfig.from_dir(model_dir, "float32")
    name = "model.layers.0.self_attn.k_proj.bias"
    for value, ok in ((0.0, True), (0.5, False)):
        save_file({**tensors, name: torch.full((16,), value)}, model_dir / "model.safetensors")
        model = build_model(cfg, TPGroup(), quant_method_for(cfg))
        assert model.optional_checkpoint_names()[name] == ("model.layers.0.self_attn.qkv_proj.bias", "k")
        if ok:
            load_weights(model, model_dir, show_progress=False)
        else:
            with pytest.raises(ValueError, match=f"'{name}' is not zero"):
                load_weights(model, model_dir, show_progress=False)
    # Any other stray tensor is still an error.
    stray = {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}
    save_file({**tensors, **stray}, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors.*k_proj.weight"):
        load_weights(build_model(cfg, TPGroup(), quant_method_for(cfg)), model_dir, show_progress=False)
