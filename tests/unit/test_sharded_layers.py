"""Each sharded layer, built for every rank of a simulated group, reproduces the unsharded layer.

No process group is needed: each rank's layer runs with a group whose all_reduce is the identity,
and the test performs the reduction (sum) or concatenation itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.dist_harness import local_ranks
from tpserve.distributed import TPGroup
from tpserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tpserve.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tpserve.layers.sources import InMemorySource, WeightShapeError


def load(layer, name, tensor, shard_id=None):
    param = getattr(layer, name)
    param.weight_loader(param, InMemorySource(name, tensor), shard_id)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_and_row_parallel(tp_size):
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16)
    x = torch.randn(5, 16)
    want = F.linear(F.linear(x, w1, b1), w2, b2)
    partials = []
    for tp in local_ranks(tp_size):
        col = ColumnParallelLinear(16, 32, True, tp, torch.float32)
        row = RowParallelLinear(32, 16, True, tp, torch.float32)
        load(col, "weight", w1), load(col, "bias", b1), load(row, "weight", w2), load(row, "bias", b2)
        assert col.weight.shape == (32 // tp_size, 16) and row.weight.shape == (16, 32 // tp_size)
        # Bias is added once per rank after the (simulated) reduction: subtract the extra copies.
        partials.append(row(col(x)) - (b2 if tp.tp_rank else 0))
    torch.testing.assert_close(sum(partials), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_merged_column_matches_separate(tp_size):
    torch.manual_seed(1)
    gate, up, x = torch.randn(24, 8), torch.randn(24, 8), torch.randn(3, 8)
    outs = []
    for tp in local_ranks(tp_size):
        layer = MergedColumnParallelLinear(8, [24, 24], False, tp, torch.float32)
        load(layer, "weight", gate, 0), load(layer, "weight", up, 1)
        g, u = layer(x).chunk(2, dim=-1)
        outs.append((g, u))
    torch.testing.assert_close(torch.cat([g for g, _ in outs], -1), x @ gate.T)
    torch.testing.assert_close(torch.cat([u for _, u in outs], -1), x @ up.T)


@pytest.mark.parametrize("num_kv_heads,tp_size", [(2, 1), (2, 2), (4, 2), (2, 4), (1, 4), (8, 4)])
def test_qkv_sharding_and_kv_replication(num_kv_heads, tp_size):
    torch.manual_seed(2)
    heads, head_dim, hidden = 8, 4, 16
    wq = torch.randn(heads * head_dim, hidden)
    wk = torch.randn(num_kv_heads * head_dim, hidden)
    wv = torch.randn(num_kv_heads * head_dim, hidden)
    bq, bk, bv = torch.randn(heads * head_dim), torch.randn(num_kv_heads * head_dim), torch.randn(num_kv_heads * head_dim)
    x = torch.randn(3, hidden)
    q_ref = F.linear(x, wq, bq).view(3, heads, head_dim)
    k_ref = F.linear(x, wk, bk).view(3, num_kv_heads, head_dim)
    v_ref = F.linear(x, wv, bv).view(3, num_kv_heads, head_dim)
    group = heads // num_kv_heads
    for tp in local_ranks(tp_size):
        layer = QKVParallelLinear(hidden, head_dim, heads, num_kv_heads, True, tp, torch.float32)
        for shard, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            load(layer, "weight", w, shard), load(layer, "bias", b, shard)
        q, k, v = layer.split(layer(x))
        q = q.view(3, layer.num_heads, head_dim)
        k = k.view(3, layer.num_kv_heads, head_dim)
        v = v.view(3, layer.num_kv_heads, head_dim)
        q_heads = list(range(tp.tp_rank * layer.num_heads, (tp.tp_rank + 1) * layer.num_heads))
        torch.testing.assert_close(q, q_ref[:, q_heads])
        # Each local query head must find the kv head it uses in the unsharded model.
        for local_q, global_q in enumerate(q_heads):
            local_kv = local_q // (layer.num_heads // layer.num_kv_heads)
            torch.testing.assert_close(k[:, local_kv], k_ref[:, global_q // group])
            torch.testing.assert_close(v[:, local_kv], v_ref[:, global_q // group])


@pytest.mark.parametrize("vocab,tp_size", [(203, 1), (203, 2), (203, 4), (256, 4), (7, 8)])
def test_vocab_parallel_embedding_and_head(vocab, tp_size):
    torch.manual_seed(3)
    w = torch.randn(vocab, 6)
    ids = torch.randint(0, vocab, (11,))
    ids[0], ids[-1] = 0, vocab - 1
    hidden = torch.randn(4, 6)
    emb_sum, logits = 0, []
    for tp in local_ranks(tp_size):
        emb = VocabParallelEmbedding(vocab, 6, tp, torch.float32)
        head = ParallelLMHead(vocab, 6, tp, torch.float32)
        load(emb, "weight", w), load(head, "weight", w)
        assert emb.weight.shape[0] == -(-vocab // tp_size)
        emb_sum = emb_sum + emb(ids)
        logits.append(F.linear(hidden, head.weight))
    torch.testing.assert_close(emb_sum, w[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], hidden @ w.T)


def test_loader_rejects_wrong_shape():
    layer = ColumnParallelLinear(8, 16, False, TPGroup(), torch.float32)
    with pytest.raises(WeightShapeError, match=r"'w' has shape \[16, 9\].*\[16, 8\]"):
        layer.weight.weight_loader(layer.weight, InMemorySource("w", torch.randn(16, 9)))
