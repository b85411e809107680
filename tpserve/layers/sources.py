"""Lazy tensor sources handed to `weight_loader`s, so each rank reads only its own slice from disk."""

from __future__ import annotations

from typing import Protocol

import torch


class TensorSource(Protocol):
    """A checkpoint tensor that can be read whole or as a range along one dimension."""

    name: str
    shape: tuple[int, ...]

    def read(self, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor: ...


class SafetensorsSource:
    """Wraps a safetensors `get_slice` handle; reading a range touches only those bytes."""

    def __init__(self, name: str, handle) -> None:
        self.name = name
        self._handle = handle
        self.shape = tuple(handle.get_shape())

    def read(self, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        if dim is None:
            return self._handle[:]
        end = self.shape[dim] if end is None else end
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, end)
        return self._handle[tuple(index)]


class InMemorySource:
    """Same interface over a tensor already in memory (tests, converted checkpoints)."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name = name
        self._tensor = tensor
        self.shape = tuple(tensor.shape)

    def read(self, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        if dim is None:
            return self._tensor
        end = self.shape[dim] if end is None else end
        return self._tensor.narrow(dim, start, end - start)


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model config implies."""


def check_shape(source: TensorSource, expected: tuple[int, ...]) -> None:
    if tuple(source.shape) != tuple(expected):
        raise WeightShapeError(
            f"checkpoint tensor {source.name!r} has shape {list(source.shape)}, "
            f"but the model config implies {list(expected)}"
        )


def default_weight_loader(param, source: TensorSource, shard_id=None) -> None:
    """Replicated parameters (norms): every rank reads the whole tensor."""
    check_shape(source, tuple(param.shape))
    param.data.copy_(source.read())
