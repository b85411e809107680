"""RMSNorm, computed in float32 exactly as the HF Llama reference does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x [*, hidden_size] -> same shape. Weight [hidden_size] is replicated on every rank."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (the fused op equals h * rsqrt(mean(h^2) + eps) bit for bit), cast
        # back, then scale: the reference's order of operations.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)
