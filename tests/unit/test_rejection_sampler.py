"""Speculative verification: greedy cases by hand, seeded repeatability, and losslessness measured
on 100k samples."""

from __future__ import annotations

import torch

from tpserve.engine.spec_decode.rejection import verify_coupled, verify_greedy, verify_sampled

V, K, N = 6, 3, 100_000


def one_hot_logits(ids):
    logits = torch.full((len(ids), V), -5.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 5.0
    return logits


def test_greedy_all_accepted_gives_bonus():
    assert verify_greedy(one_hot_logits([1, 2, 3, 4]), [1, 2, 3]) == [1, 2, 3, 4]


def test_greedy_first_mismatch_takes_target_token():
    assert verify_greedy(one_hot_logits([1, 5, 3, 4]), [1, 2, 3]) == [1, 5]
    assert verify_greedy(one_hot_logits([0, 2, 3, 4]), [1, 2, 3]) == [0]
    assert verify_greedy(one_hot_logits([4]), []) == [4]


def _dists(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, dim=-1)
    return p, q


def _run(p, q, n, seed):
    """Emitted tokens per position [n, K + 1] (-1 where the sequence stopped earlier)."""
    gen = torch.Generator().manual_seed(seed)
    proposals = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=gen) for i in range(K)], 1)
    out = torch.full((n, K + 1), -1, dtype=torch.long)
    for row in range(n):
        tokens = verify_sampled(p, q, proposals[row].tolist(), gen)
        out[row, : len(tokens)] = torch.tensor(tokens)
    return out


def test_seeded_runs_repeat_exactly():
    p, q = _dists(0)
    assert torch.equal(_run(p, q, 300, seed=7), _run(p, q, 300, seed=7))
    assert not torch.equal(_run(p, q, 300, seed=7), _run(p, q, 300, seed=8))


def test_emitted_tokens_follow_the_target_distribution():
    """The first emitted token is always present: its law must be p_1, whatever q is. Each later
    position, among sequences that reached it through accepted proposals, must follow p_j too
    (the target's distributions here do not depend on the prefix)."""
    p, q = _dists(1)
    out = _run(p, q, N, seed=3)
    for j in range(K + 1):
        col = out[:, j]
        col = col[col >= 0]
        emp = torch.bincount(col, minlength=V).double() / len(col)
        tv_target = 0.5 * (emp - p[j].double()).abs().sum()
        assert tv_target < 0.01 or (j > 0 and len(col) < 20_000 and tv_target < 0.02), (j, len(col), tv_target)
        if j < K:
            tv_draft = 0.5 * (emp - q[j].double()).abs().sum()
            assert tv_draft > 5 * max(tv_target, 0.01), (j, tv_draft, tv_target)


def test_never_outside_the_target_support():
    """Tokens masked out of the target distribution (e.g. by top-k / top-p) are never emitted,
    even when the draft proposes them often."""
    p, q = _dists(2)
    p[:, 3:] = 0
    p = p / p.sum(-1, keepdim=True)
    q[:, 4] += 2.0
    q = q / q.sum(-1, keepdim=True)
    out = _run(p, q, 5000, seed=4)
    assert set(out[out >= 0].tolist()) <= {0, 1, 2}


def test_identical_distributions_accept_everything():
    p, _ = _dists(5)
    out = _run(p, p[:K].clone(), 2000, seed=6)
    assert (out >= 0).all(), "with q == p every proposal must be accepted"


def _coupled(p, q, n, seed, k=K):
    """Seeded verification over n runs: the draft proposes argmax(q / E) with the target's own
    position draws E; -> emitted tokens [n, k + 1] (-1 past the end) and the plain samples argmax(p / E)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((n, k + 1), -1, dtype=torch.long)
    plain = torch.empty((n, k + 1), dtype=torch.long)
    for row in range(n):
        noise = torch.empty(k + 1, V).exponential_(generator=gen)
        proposals = [int((q[i] / noise[i]).argmax()) for i in range(k)]
        tokens = verify_coupled(p[: k + 1], proposals, noise)
        out[row, : len(tokens)] = torch.tensor(tokens)
        plain[row] = (p[: k + 1] / noise).argmax(dim=-1)
    return out, plain


def test_coupled_verification_emits_exactly_the_plain_samples_whatever_k():
    """A seeded request's tokens equal plain sampling's with the same position draws: where the
    run stopped early the next step draws the next position's token from the same E."""
    p, q = _dists(2)
    for k in (0, 1, K):
        out, plain = _coupled(p, q, 2000, seed=11, k=k)
        emitted = out >= 0
        assert torch.equal(out[emitted], plain[emitted])
        assert bool(emitted[:, 0].all())


def test_coupled_verification_is_lossless_and_accepts_often():
    p, q = _dists(1)
    out, _ = _coupled(p, q, N // 4, seed=5)
    first = torch.bincount(out[:, 0], minlength=V).float() / out.shape[0]
    assert torch.allclose(first, p[0], atol=0.01), (first, p[0])
    accepted = (out[:, 1] >= 0).float().mean()  # the first proposal was accepted
    tv = 0.5 * float((p[0] - q[0]).abs().sum())
    assert accepted > (1 - tv) / (1 + tv) - 0.02, (accepted, tv)  # the Gumbel-max coupling's guarantee
