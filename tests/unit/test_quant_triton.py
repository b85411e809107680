"""Quantised layers through the Triton W8A16 / W4A16 kernels (interpreter on CPU, tiny shapes)
equal the torch reference path, act-order gather and padding included."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import gptq_tensors
from tests.dist_harness import LocalGroup
from tpserve.distributed import TPGroup
from tpserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from tpserve.layers.sources import InMemorySource
from tpserve.ops.dispatch import triton_available, use_backend
from tpserve.ops.quant import quantize_int8
from tpserve.quant.config import QuantConfig
from tpserve.quant.methods import get_quant_method

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")




def _load(layer, tensors, shard_id=None):
    for suffix, t in tensors.items():
        layer.load_checkpoint_tensor(suffix, InMemorySource(suffix, t), shard_id)


def _both(layer, x):
    with torch.no_grad(), use_backend("torch"):
        ref = layer(x)
    with torch.no_grad(), use_backend("triton"):
        got = layer(x)
    return got, ref


def test_int4_act_order_row_shard_with_padding_and_int8_column():
    torch.manual_seed(0)
    k, n, group = 64, 24, 16
    g_idx = (torch.arange(k) // group)[torch.randperm(k)]
    tensors, _ = gptq_tensors(torch.randn(n, k), group, False, g_idx)
    quant = get_quant_method(QuantConfig.from_hf({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True}}))
    row = RowParallelLinear(k, n, True, LocalGroup(tp_rank=1, tp_size=2), torch.float32, quant)
    _load(row, {**tensors, "bias": torch.randn(n)})
    row.finish_loading()
    assert row.act_pad  # the kernel sees the gathered, padded activations
    got, ref = _both(row, torch.randn(3, k // 2))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)

    int8 = get_quant_method(QuantConfig.from_hf({"quantization_config": {"quant_method": "tpserve", "bits": 8}}))
    col = MergedColumnParallelLinear(32, [16, 16], True, TPGroup(), torch.float32, int8)
    for shard in (0, 1):
        q, s = quantize_int8(torch.randn(16, 32))
        _load(col, {"qweight": q, "scales": s, "bias": torch.randn(16)}, shard)
    got, ref = _both(col, torch.randn(2, 32))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
