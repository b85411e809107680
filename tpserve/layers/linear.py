"""Tensor-parallel linear layers.

Shapes follow `torch.nn.functional.linear`: a float weight is [out_features_per_rank,
in_features_per_rank]. Column-parallel layers split output features across ranks (no
communication); row-parallel layers split input features and all-reduce their partial sums.

Loading: every layer describes, per checkpoint tensor (a whole projection, or one shard of a fused
one), which part of the *global* tensor this rank holds as a `ShardPlan`. The quant method turns
that plan into range reads of its own checkpoint format (`load`), so float and quantised
layouts share one description of the sharding; `checkpoint_suffixes()` names the tensors a layer
expects (e.g. "weight", or "qweight"/"scales"/... plus "bias").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpserve.distributed import TPGroup
from tpserve.layers.sources import TensorSource, check_shape
from tpserve.ops import dispatch


def shard_range(total: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(start, size) of rank `tp_rank`'s equal share of `total`, which must divide evenly."""
    if total % tp_size:
        raise ValueError(f"size {total} is not divisible by tp_size={tp_size}")
    size = total // tp_size
    return tp_rank * size, size


@dataclass(frozen=True)
class ShardPlan:
    """This rank's part of one global checkpoint projection W [out_total, in_total].

    Output features [out_start, out_start + out_size) land at [out_offset, out_offset + out_size)
    of the rank's (possibly fused) output; input features [in_start, in_start + in_size) are the
    rank's input. At most one of the two dimensions is split."""

    out_total: int
    out_start: int
    out_size: int
    out_offset: int
    in_total: int
    in_start: int
    in_size: int

    @property
    def in_split(self) -> bool:
        return self.in_size != self.in_total


class UnquantizedLinearMethod:
    """Plain floating-point weights. Quantised methods (tpserve.quant) implement the same calls."""

    name = "none"
    checkpoint_suffixes = ("weight",)

    def create_weights(self, layer: "LinearBase", in_features: int, out_features: int, dtype) -> None:
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.register_parameter("weight", weight)

    def load(self, layer: "LinearBase", suffix: str, source: TensorSource, plan: ShardPlan, shard_id) -> None:
        check_shape(source, (plan.out_total, plan.in_total))
        if plan.in_split:
            data = source.read(1, plan.in_start, plan.in_start + plan.in_size)
        else:
            data = source.read(0, plan.out_start, plan.out_start + plan.out_size)
        layer.weight.data[plan.out_offset : plan.out_offset + plan.out_size].copy_(data)

    def finish(self, layer: "LinearBase") -> None:
        """Called once after every checkpoint tensor of the layer was loaded."""

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return dispatch.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Common construction: per-rank sizes, the quant method's weights, an optional bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPGroup,
        dtype: torch.dtype,
        quant_method=None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.in_features = in_features  # per rank
        self.out_features = out_features  # per rank
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, out_features, dtype)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def shard_plan(self, shard_id=None) -> ShardPlan:
        raise NotImplementedError

    def checkpoint_suffixes(self) -> tuple[str, ...]:
        """Names (after the module's own name) of the checkpoint tensors this layer reads."""
        return tuple(self.quant_method.checkpoint_suffixes) + (("bias",) if self.bias is not None else ())

    def optional_checkpoint_suffixes(self) -> tuple[str, ...]:
        """Tensors a checkpoint may carry that this layer does not need: GPTQ exporters may store
        an all-zero `bias` for layers without one. It is read and must be zero."""
        return ("bias",) if self.bias is None and getattr(self.quant_method, "zero_bias_allowed", False) else ()

    def load_checkpoint_tensor(self, suffix: str, source: TensorSource, shard_id=None) -> None:
        plan = self.shard_plan(shard_id)
        if suffix == "bias" and self.bias is None:
            if bool(source.read().any()):
                raise ValueError(f"checkpoint tensor {source.name!r} is not zero, but the model config "
                                 "gives this layer no bias")
        elif suffix == "bias":
            # Biases are never quantised; row-parallel plans cover all outputs, so this reads all.
            check_shape(source, (plan.out_total,))
            data = source.read(0, plan.out_start, plan.out_start + plan.out_size)
            self.bias.data[plan.out_offset : plan.out_offset + plan.out_size].copy_(data)
        else:
            self.quant_method.load(self, suffix, source, plan, shard_id)

    def weight_loader(self, param: nn.Parameter, source: TensorSource, shard_id=None) -> None:
        """Per-parameter entry point (the parameter's name is the checkpoint suffix)."""
        name = next(n for n, p in self.named_parameters(recurse=False) if p is param)
        self.load_checkpoint_tensor(name, source, shard_id)

    def finish_loading(self) -> None:
        self.quant_method.finish(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """y[:, rank's columns] = x W_rank^T + b_rank. Global weight [out_features, in_features]."""

    def __init__(self, in_features, out_features, bias, tp, dtype, quant_method=None):
        self.global_out_features = out_features
        _, out_per_rank = shard_range(out_features, tp.tp_rank, tp.tp_size)
        super().__init__(in_features, out_per_rank, bias, tp, dtype, quant_method)

    def shard_plan(self, shard_id=None) -> ShardPlan:
        start, size = shard_range(self.global_out_features, self.tp.tp_rank, self.tp.tp_size)
        return ShardPlan(self.global_out_features, start, size, 0, self.in_features, 0, self.in_features)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate_up_proj).

    Rank r's weight is the concatenation of rank r's slice of each projection.
    """

    def __init__(self, in_features, output_sizes: list[int], bias, tp, dtype, quant_method=None):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, tp, dtype, quant_method)

    def shard_plan(self, shard_id=None) -> ShardPlan:
        total = self.output_sizes[shard_id]
        start, size = shard_range(total, self.tp.tp_rank, self.tp.tp_size)
        offset = sum(s // self.tp.tp_size for s in self.output_sizes[:shard_id])
        return ShardPlan(total, start, size, offset, self.in_features, 0, self.in_features)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Query heads are split across ranks; kv heads are split when there
    are at least `tp_size` of them, otherwise replicated so each rank holds the kv head its query
    heads attend with (GQA/MQA with few kv heads).
    """

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, bias, tp, dtype, quant_method=None):
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // tp.tp_size
        if num_kv_heads >= tp.tp_size:
            self.num_kv_heads = num_kv_heads // tp.tp_size
            self.kv_head_start = tp.tp_rank * self.num_kv_heads
        else:
            self.num_kv_heads = 1
            self.kv_head_start = tp.tp_rank // (tp.tp_size // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out_per_rank = self.q_size + 2 * self.kv_size
        LinearBase.__init__(self, hidden_size, out_per_rank, bias, tp, dtype, quant_method)

    def shard_plan(self, shard_id=None) -> ShardPlan:
        if shard_id == "q":
            total_heads, head_start, offset, size = (
                self.total_num_heads, self.tp.tp_rank * self.num_heads, 0, self.q_size)
        elif shard_id in ("k", "v"):
            total_heads, head_start, size = self.total_num_kv_heads, self.kv_head_start, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        total = total_heads * self.head_dim
        return ShardPlan(total, head_start * self.head_dim, size, offset, self.in_features, 0, self.in_features)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_rank W_rank^T) + b. Input [*, in_features/tp]; output [*, out_features]
    (global). The bias is added once, after the reduction."""

    def __init__(self, in_features, out_features, bias, tp, dtype, quant_method=None, reduce_results=True):
        self.global_in_features = in_features
        _, in_per_rank = shard_range(in_features, tp.tp_rank, tp.tp_size)
        self.reduce_results = reduce_results
        super().__init__(in_per_rank, out_features, bias, tp, dtype, quant_method)

    def shard_plan(self, shard_id=None) -> ShardPlan:
        start, size = shard_range(self.global_in_features, self.tp.tp_rank, self.tp.tp_size)
        return ShardPlan(self.out_features, 0, self.out_features, 0, self.global_in_features, start, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        y = self.quant_method.apply(self, x, None)
        if self.reduce_results:
            self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
