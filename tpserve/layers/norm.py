"""RMSNorm, computed in float32 exactly as the HF Llama reference does."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x [*, hidden_size] -> same shape. Weight [hidden_size] is replicated on every rank."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
