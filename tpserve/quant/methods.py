"""Quantised linear methods: per-rank parameters in the W8A16 / W4A16 kernel layouts, their
sharded loading from the three checkpoint formats, and the matmul calls.

Per rank (K_l = in_features_per_rank, N_l = out_features_per_rank, G = group_size):
    Int8LinearMethod  qweight int8 [N_l, K_l], scales fp32 [N_l]
    Int4LinearMethod  qweight int32 [K_l // 8, N_l], scales fp32 [K_l // G, N_l],
                      zeros uint8 [K_l // G, N_l]; K_l rounds up to whole groups when G does
                      not divide it (zero rows, x zero-padded); GPTQ act-order adds act_index
                      int64 [Kp] (rows after sorting by group and padding, tpserve.quant.formats)
Column-parallel layers hold all K rows and a slice of N; row-parallel layers hold all N columns
and the rank's K rows, which must be whole groups (`QuantConfig.tp_problem`). Scales are kept in
fp32 (exact for fp16/bf16 checkpoints; the kernels accept fp32 with any activation dtype).

A layer's tensors of one checkpoint projection (e.g. q_proj's qweight, qzeros, scales, g_idx)
depend on each other (act-order rows follow g_idx), so `load` collects the sources of one shard
and converts it when the last one arrives; the loader keeps every checkpoint file open meanwhile,
so only the ranges a rank needs are ever read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpserve.config import ModelConfig
from tpserve.errors import ConfigError
from tpserve.layers.linear import ShardPlan
from tpserve.layers.sources import TensorSource, check_shape
from tpserve.ops.dispatch import w4a16_matmul, w8a16_matmul
from tpserve.quant.config import QuantConfig
from tpserve.quant.formats import (
    Int4Shard,
    QuantFormatError,
    act_order_layout,
    pad_last_group,
    read_awq,
    read_gptq,
    read_tpserve_int4,
)

SUFFIXES = {
    "tpserve": ("qweight", "scales", "zeros"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
}


def _param(layer: nn.Module, name: str, shape, dtype) -> None:
    layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))


class QuantMethodBase:
    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.name = config.name


class Int8LinearMethod(QuantMethodBase):
    """Symmetric per-output-channel int8 weights (tpserve format only)."""

    checkpoint_suffixes = ("qweight", "scales")

    def create_weights(self, layer, in_features: int, out_features: int, dtype) -> None:
        _param(layer, "qweight", (out_features, in_features), torch.int8)
        _param(layer, "scales", (out_features,), torch.float32)

    def load(self, layer, suffix: str, source: TensorSource, plan: ShardPlan, shard_id) -> None:
        out = slice(plan.out_offset, plan.out_offset + plan.out_size)
        if suffix == "qweight":
            check_shape(source, (plan.out_total, plan.in_total))
            if plan.in_split:
                data = source.read(1, plan.in_start, plan.in_start + plan.in_size)
            else:
                data = source.read(0, plan.out_start, plan.out_start + plan.out_size)
            if data.dtype != torch.int8:
                raise QuantFormatError(f"{source.name} must be int8, got {data.dtype}")
            layer.qweight.data[out].copy_(data)
        else:  # scales [N] follow the output channels; row-parallel plans cover all of them
            check_shape(source, (plan.out_total,))
            layer.scales.data[out].copy_(source.read(0, plan.out_start, plan.out_start + plan.out_size))

    def finish(self, layer) -> None:
        pass

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return w8a16_matmul(x, layer.qweight, layer.scales, bias)


class Int4LinearMethod(QuantMethodBase):
    """Group-wise int4 weights from tpserve, GPTQ (v1/v2, act-order) or AWQ (GEMM) checkpoints."""

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.checkpoint_suffixes = SUFFIXES[config.method]
        self.act_order = config.method == "gptq" and config.desc_act
        self.zero_bias_allowed = config.method == "gptq"  # exporters may save zero biases

    def create_weights(self, layer, in_features: int, out_features: int, dtype) -> None:
        g = self.config.group_size
        k_total = getattr(layer, "global_in_features", in_features)
        # A split K must fall on group boundaries (act-order shards are padded per group instead);
        # an unsplit K may end in a partial group. Either way the int32 packs hold 8 whole rows.
        unit = g if k_total != in_features and not self.act_order else 8
        if in_features % unit:
            what = f"a quantisation group of {g} rows" if unit == g else "the 8-row int32 packing"
            raise ConfigError(
                f"{type(layer).__name__} with K={k_total} input features split {k_total // in_features} ways "
                f"holds {in_features} rows per rank, not a multiple of {unit}: a shard would cut {what}")
        # Rows are padded to whole groups (zero weights, zero activations); act-order row-parallel
        # shards are resized at load, as their padding depends on g_idx.
        groups = -(-in_features // g)
        layer.k_pad = groups * g - in_features
        _param(layer, "qweight", (groups * g // 8, out_features), torch.int32)
        _param(layer, "scales", (groups, out_features), torch.float32)
        _param(layer, "zeros", (groups, out_features), torch.uint8)
        layer.register_buffer("act_index", None)
        layer.act_pad = False

    def load(self, layer, suffix: str, source: TensorSource, plan: ShardPlan, shard_id) -> None:
        stage = layer.__dict__.setdefault("_quant_stage", {}).setdefault(shard_id, {})
        if suffix in stage:
            raise QuantFormatError(f"{source.name}: loaded twice")
        stage[suffix] = source
        if len(stage) < len(self.checkpoint_suffixes):
            return
        del layer._quant_stage[shard_id]
        shard = self._read(stage, plan)
        if shard.g_idx is not None:
            shard, index = act_order_layout(shard, self.config.group_size, full_k=not plan.in_split)
            self._set_act_index(layer, index, stage["g_idx"].name)
        else:
            shard = pad_last_group(shard, self.config.group_size)
        self._write(layer, shard, plan)

    def _read(self, src: dict[str, TensorSource], plan: ShardPlan) -> Int4Shard:
        cfg = self.config
        if cfg.method == "tpserve":
            return read_tpserve_int4(src, plan, cfg.group_size)
        if cfg.method == "gptq":
            return read_gptq(src, plan, cfg.group_size, self.act_order, cfg.checkpoint_format == "gptq_v2")
        return read_awq(src, plan, cfg.group_size)

    def _set_act_index(self, layer, index: torch.Tensor, name: str) -> None:
        index = index.to(layer.qweight.device)
        if layer.act_index is None:
            layer.act_index = index
            layer.act_pad = bool((index == layer.in_features).any())
        elif not torch.equal(layer.act_index, index):
            # One fused matmul can only permute its input one way.
            raise QuantFormatError(f"{name}: the shards of a fused layer (q/k/v or gate/up) must share one "
                                   "g_idx under act-order, but this one differs")

    def _write(self, layer, shard: Int4Shard, plan: ShardPlan) -> None:
        tensors = {"qweight": shard.qweight, "scales": shard.scales, "zeros": shard.zeros}
        for name, value in tensors.items():
            param = getattr(layer, name)
            if plan.in_split:  # row-parallel: one shard covers all N; act-order may change K rows
                if value.shape != param.shape and not self.act_order:
                    raise QuantFormatError(f"{name}: converted shape {list(value.shape)} != {list(param.shape)}")
                param.data = value.to(device=param.device, dtype=param.dtype).contiguous()
            else:
                param.data[:, plan.out_offset : plan.out_offset + plan.out_size].copy_(value)

    def finish(self, layer) -> None:
        pending = layer.__dict__.pop("_quant_stage", {})
        if pending:
            missing = {sid: sorted(set(self.checkpoint_suffixes) - set(parts)) for sid, parts in pending.items()}
            raise QuantFormatError(f"incomplete quantised tensors for {type(layer).__name__}: missing {missing}")
        if self.act_order and layer.act_index is None:
            raise QuantFormatError(f"{type(layer).__name__}: act-order layer finished without g_idx")

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.act_index is not None:
            if layer.act_pad:
                x = F.pad(x, (0, 1))  # the zero column that padding rows read
            x = x.index_select(-1, layer.act_index)
        elif layer.k_pad:
            x = F.pad(x, (0, layer.k_pad))  # K ends inside a group: zeros meet the zero-weight rows
        return w4a16_matmul(x, layer.qweight, layer.scales, layer.zeros, self.config.group_size, bias)


def get_quant_method(config: QuantConfig | None):
    """The linear method for a parsed config (None: float weights)."""
    if config is None:
        return None
    return Int8LinearMethod(config) if config.bits == 8 else Int4LinearMethod(config)


def quant_method_for(model_config: ModelConfig):
    """The linear method that `model_config`'s quantization_config asks for, or None."""
    return get_quant_method(model_config.quant)
