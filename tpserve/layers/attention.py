"""Attention over this rank's paged KV cache (local heads only)."""

from __future__ import annotations

import torch
from torch import nn

from tpserve.ops import dispatch
from tpserve.ops.attention import AttentionMetadata


class Attention(nn.Module):
    """q [num_tokens, num_heads * head_dim], k/v [num_tokens, num_kv_heads * head_dim] (per rank)
    -> [num_tokens, num_heads * head_dim]. Writes the new K/V into the cache first. kv_cache is
    (k_cache, v_cache) or (k_cache, v_cache, k_rows, v_rows) (see tpserve.ops.kv_rows)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(self, q, k, v, kv_cache: tuple[torch.Tensor, ...], meta: AttentionMetadata):
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[:2]
        rows = kv_cache[2:] or None  # (k_rows, v_rows) when the runner keeps contiguous rows
        out = dispatch.attention(q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window, rows)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
