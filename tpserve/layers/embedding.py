"""Vocab-parallel embedding and LM head.

The vocabulary is split into `tp_size` equal shards of `ceil(vocab_size / tp_size)` rows; the last
shard is zero-padded when the vocabulary does not divide evenly, so every rank has the same shape
(needed for the gather of logits). Rows past `vocab_size` are never looked up and are trimmed from
the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpserve.distributed import TPGroup
from tpserve.layers.sources import TensorSource, check_shape
from tpserve.ops import dispatch


class VocabParallelEmbedding(nn.Module):
    """Input token ids [num_tokens] -> hidden [num_tokens, hidden_size]. Weight per rank:
    [shard_size, hidden_size] holding global rows [vocab_start, vocab_start + shard_size)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.tp_size)
        self.vocab_start = tp.tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, vocab_size)
        self.weight = nn.Parameter(
            torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source: TensorSource, shard_id=None) -> None:
        check_shape(source, (self.vocab_size, param.shape[1]))
        rows = self.vocab_end - self.vocab_start
        if rows > 0:
            param.data[:rows].copy_(source.read(0, self.vocab_start, self.vocab_end))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)
        out.mul_(in_shard.unsqueeze(-1).to(out.dtype))
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden [num_tokens, hidden_size] -> logits [num_tokens, vocab_size] on rank 0 (None elsewhere).

    With tied embeddings the model points `weight` at the embedding's parameter instead.
    """

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        local = dispatch.linear(hidden, self.weight)
        full = self.tp.gather_to_first(local, dim=-1)
        if full is None:
            return None
        return full[..., : self.vocab_size]
