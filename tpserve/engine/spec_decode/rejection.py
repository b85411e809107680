"""Lossless verification of speculative proposals.

For one sequence with k proposals x_1..x_k, `target_probs` [k + 1, V] are the target's processed
distributions at the k + 1 verified positions and `draft_probs` [k, V] the distributions the
proposals were drawn from (one-hot for deterministic proposers such as n-gram lookup).

Sampled requests: x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection the token is drawn from normalise(max(p_i - q_i, 0)); if all k are accepted a bonus token
is drawn from p_{k+1}. The emitted tokens are then distributed exactly as sampling from the target
one token at a time. Greedy requests keep the longest prefix equal to the target's argmax, then
the target's argmax.
"""

from __future__ import annotations

import torch


def verify_greedy(target_logits: torch.Tensor, proposals: list[int]) -> list[int]:
    """target_logits [k + 1, V] (processed) -> accepted proposals + one target token."""
    best = target_logits.argmax(dim=-1).tolist()
    out = []
    for i, x in enumerate(proposals):
        if x != best[i]:
            out.append(best[i])
            return out
        out.append(x)
    out.append(best[len(proposals)])
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One categorical sample by the exponential race (exact, and batch-independent)."""
    noise = torch.empty(probs.shape[-1]).exponential_(generator=generator).to(probs.device)
    return int((probs / noise).argmax())


def verify_sampled(target_probs: torch.Tensor, draft_probs: torch.Tensor, proposals: list[int],
                   generator: torch.Generator) -> list[int]:
    """-> accepted proposals followed by one corrected or bonus token."""
    out = []
    for i, x in enumerate(proposals):
        p, q = float(target_probs[i, x]), float(draft_probs[i, x])
        u = float(torch.rand((), generator=generator))
        if q > 0 and u * q < p:  # u < p / q without dividing by a tiny q
            out.append(x)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        total = float(residual.sum())
        # p == q exactly leaves no residual mass; then any draw from p is correct.
        out.append(_draw(residual / total if total > 0 else target_probs[i], generator))
        return out
    out.append(_draw(target_probs[len(proposals)], generator))
    return out


def verify_coupled(target_probs: torch.Tensor, proposals: list[int], noise: torch.Tensor) -> list[int]:
    """Verification for a seeded request: noise [k + 1, V] holds the Exp(1) draws of positions
    t..t+k, the same ones plain sampling and the draft's proposals use there. The token at each
    position is argmax(p / E) of the target's distribution, exactly what plain sampling would
    emit, so the output is lossless (each E is fresh and independent of the context before it) and
    does not depend on k, on the draft, or on whether the step speculated at all; a proposal is
    accepted while it equals that token (the Gumbel-max coupling of draft and target)."""
    out = []
    for i, x in enumerate(proposals):
        token = int((target_probs[i] / noise[i]).argmax())
        out.append(token)
        if token != x:
            return out
    out.append(int((target_probs[len(proposals)] / noise[len(proposals)]).argmax()))
    return out
