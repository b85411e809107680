"""Rank 0's sampler: per-request logits processing and seeded sampling over a batch.

Processing order (as in HF generate): repetition penalty, presence/frequency penalties, the
min_tokens ban on stop tokens, temperature, top-k, top-p, min-p. Sampling draws by the exponential
race (argmax of p / E, E ~ Exp(1)), which is an exact categorical sample. A seeded request's E for
the token at position t comes from a generator keyed by (seed, t) alone, so its tokens depend on
nothing but its own context: not its batch mates, not preemption, not whether or how far it
speculated (speculative verification of seeded requests uses the same E: see
spec_decode/rejection.py, verify_coupled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpserve.engine.sequence import Sequence

NEG_INF = float("-inf")


@dataclass
class TokenLogprobs:
    """Logprob of the chosen token and the top-n alternatives, from the raw model distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64, device=logits.device)
            scores = logits[row, ids]
            scores = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
            logits[row, ids] = scores
        if p.presence_penalty or p.frequency_penalty:
            out = seq.output_token_ids
            if out:
                ids, counts = torch.tensor(out, device=logits.device).unique(return_counts=True)
                logits[row, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def ban_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                logits[row, banned] = NEG_INF
    return logits


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """top_k [B] int (0 or -1: off)."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p [B]."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p).unsqueeze(-1)
    remove[:, -1] = False
    mask = remove.scatter(-1, order, remove)
    return logits.masked_fill(mask, NEG_INF)


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(-1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias:
            logits[row, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """logits [B, V] float32 (not modified) -> processed logits; greedy rows skip temperature.
    A batch of greedy rows with nothing to apply gets `logits` itself back (read-only): top-k,
    top-p and min-p never remove the most likely token, so its argmax is the answer."""
    if all(_nothing_to_apply(s) for s in seqs):
        return logits
    logits = apply_penalties(logits.clone(), seqs)
    logits = apply_logit_bias(logits, seqs)
    logits = ban_stop_tokens(logits, seqs, eos_token_ids)
    params = [s.params for s in seqs]
    dev = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    logits = logits / temps.unsqueeze(-1)
    if any(p.top_k > 0 for p in params):
        logits = top_k_mask(logits, torch.tensor([p.top_k for p in params], device=dev))
    if any(p.top_p < 1.0 for p in params):
        logits = top_p_mask(logits, torch.tensor([p.top_p for p in params], device=dev))
    if any(p.min_p > 0.0 for p in params):
        logits = min_p_mask(logits, torch.tensor([p.min_p for p in params], device=dev))
    return logits


def _nothing_to_apply(seq: Sequence) -> bool:
    p = seq.params
    return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and not p.logit_bias and seq.num_output_tokens >= p.min_tokens)


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...] = (), seed: int = 0) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def noise(self, seq: Sequence, position: int, vocab_size: int) -> torch.Tensor:
        """[V] Exp(1) draws for the token at `position` of `seq`: keyed by (seed, position) for a
        seeded request, from the engine's shared generator otherwise."""
        if seq.params.seed is None:
            generator = self.generator
        else:
            generator = torch.Generator().manual_seed(position_key(seq.params.seed, position))
        return torch.empty(vocab_size).exponential_(generator=generator)

    def exponentials(self, seqs: list[Sequence], vocab_size: int) -> torch.Tensor:
        """[B, V] Exp(1) draws for each sequence's next token."""
        return torch.stack([self.noise(s, s.num_tokens, vocab_size) for s in seqs])

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [B, V] float32 for the last position of each sequence -> one token each."""
        processed = process_logits(logits, seqs, self.eos_token_ids)
        tokens = processed.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            probs = processed[rows].softmax(dim=-1)
            noise = self.exponentials([seqs[i] for i in sampled_rows], logits.shape[-1]).to(probs.device)
            tokens[rows] = (probs / noise).argmax(dim=-1)
        token_list = tokens.tolist()
        return token_list, self.logprobs(logits, seqs, token_list)

    @staticmethod
    def logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprobs | None]:
        """Row i: logprob of tokens[i] and the top-n alternatives under raw logits[i]."""
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(seqs)
        if not wanted:
            return result
        scored = token_logprobs(logits[wanted], [tokens[i] for i in wanted], [seqs[i].params.logprobs for i in wanted])
        for i, lp in zip(wanted, scored):
            result[i] = lp
        return result


def position_key(seed: int, position: int) -> int:
    """A generator seed for one (request seed, token position) pair (splitmix64 of the two)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def token_logprobs(logits: torch.Tensor, tokens: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Row i of raw logits [N, V]: the logprob of tokens[i] and the num_top[i] most likely tokens."""
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logp.device).unsqueeze(-1)).squeeze(-1)
    top_vals, top_ids = logp.topk(max(max(num_top), 1), dim=-1)
    top_vals, top_ids, chosen = top_vals.tolist(), top_ids.tolist(), chosen.tolist()
    return [TokenLogprobs(t, c, list(zip(ids[:k], vals[:k])))
            for t, c, ids, vals, k in zip(tokens, chosen, top_ids, top_vals, num_top)]
