"""Proposers of speculative tokens, both on rank 0.

`DraftProposer` runs a small draft model (unsharded) with its own KV cache tensors that share the
target's block tables: the draft's K/V for a position lives in the same block and slot as the
target's, so no second block manager is needed. Each sequence counts the positions its draft has
computed (`seq.spec.draft_computed`, from 0, never trusting prefix-cache hits, whose draft K/V
another sequence may never have written); the draft catches up on the rest in its first pass,
then proposes one token per batched pass. Every pass sends full block tables, which the draft's
runner forgets after each `propose`.

`NgramProposer` (prompt lookup) copies the tokens that followed the most recent earlier occurrence
of the sequence's last n tokens; its proposals are deterministic (one-hot draft distributions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from tpserve.engine.sampler import process_logits
from tpserve.engine.sequence import Sequence
from tpserve.engine.spec_decode.state import spec_state
from tpserve.engine.step import SeqWork, StepPlan


@dataclass
class Proposal:
    tokens: list[int]
    draft_probs: torch.Tensor | None = None  # [len(tokens), V]; None means one-hot (deterministic)
    requested: int = 0  # the k asked for (n-gram lookup may find fewer)


def with_history(seq: Sequence, extra: list[int]) -> Sequence:
    """A view of `seq` as if `extra` tokens had been generated (for penalties and min_tokens)."""
    p = seq.params
    uses_history = (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                    or seq.num_output_tokens < p.min_tokens)
    return replace(seq, token_ids=seq.token_ids + extra) if extra and uses_history else seq


class DraftProposer:
    free_proposals = False  # one draft pass per proposed token

    def __init__(self, runner, eos_token_ids: tuple[int, ...], noise_for) -> None:
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.noise_for = noise_for  # Sampler.noise: the draws a proposal at a position uses
        self.num_forwards = 0
        self.last_passes: list[tuple[int, float]] = []  # (tokens, seconds) of each pass of the last propose

    def pending_tokens(self, seq: Sequence) -> int:
        """Tokens the draft would have to catch up on before proposing for `seq`."""
        return seq.num_tokens - self._draft_computed(seq)

    @staticmethod
    def _draft_computed(seq: Sequence) -> int:
        state = spec_state(seq)
        return state.draft_computed if state.draft_preemptions == seq.num_preemptions else 0

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        proposals = [Proposal([], requested=k) for k in ks]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        self.last_passes = []
        for j in range(max(ks, default=0)):
            started = time.perf_counter()
            active = [i for i, k in enumerate(ks) if k > j]
            works = []
            for i in active:
                seq = seqs[i]
                if j == 0:
                    start = self._draft_computed(seq)
                    tokens = seq.token_ids[start:]
                else:
                    start = seq.num_tokens + j - 1
                    tokens = [proposals[i].tokens[-1]]
                works.append(SeqWork(seq.seq_id, tokens, start, block_table=list(seq.block_table)))
            logits = self.runner.execute(StepPlan(works))
            self.num_forwards += 1
            views = [with_history(seqs[i], proposals[i].tokens) for i in active]
            processed = process_logits(logits, views, self.eos_token_ids)
            for row, i in enumerate(active):
                seq = seqs[i]
                if seq.params.greedy:
                    proposals[i].tokens.append(int(processed[row].argmax()))
                    continue
                p = processed[row].softmax(dim=-1)
                # A seeded request's draws at a position are the ones its target uses there
                # (verify_coupled); others take the shared generator's next draws.
                noise = self.noise_for(seq, seq.num_tokens + len(proposals[i].tokens), p.shape[-1]).to(p.device)
                proposals[i].tokens.append(int((p / noise).argmax()))
                probs[i].append(p)
            # The tokens above were read back to the host, so the pass has finished on any device.
            self.last_passes.append((sum(len(w.token_ids) for w in works), time.perf_counter() - started))
        self.runner.forget_block_tables()
        for i, seq in enumerate(seqs):
            if ks[i] > 0:
                # K/V written for the last known token and all proposals but the newest.
                state = spec_state(seq)
                state.draft_preemptions, state.draft_computed = seq.num_preemptions, seq.num_tokens + ks[i] - 1
            if probs[i]:
                proposals[i].draft_probs = torch.stack(probs[i])
        return proposals

    def on_verified(self, seq: Sequence) -> None:
        """After verification only positions the target kept are valid for the draft too."""
        state = spec_state(seq)
        state.draft_computed = min(state.draft_computed, seq.num_computed_tokens)


class NgramProposer:
    """Prompt lookup. `lookup` states the rule; `propose` applies it through the sequence's index
    (`seq.spec.ngram`), extended by the tokens appended since the last call (a sequence's tokens
    only ever grow), so each step costs O(new tokens + k) instead of a scan of the whole context."""

    free_proposals = True  # a lookup in the token history; only verification is paid for
    last_passes: list[tuple[int, float]] = []  # no model passes

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.num_forwards = 0

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """The up to k tokens that followed the most recent earlier occurrence of the longest
        matching suffix n-gram (n from max_ngram down to min_ngram); [] when none occurs."""
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            # Most recent earlier occurrence first: recent context predicts best.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow
        return []

    def indexed_lookup(self, seq: Sequence, k: int, end: int | None = None) -> list[int]:
        """`lookup(seq.token_ids[:end], k)` through the sequence's index, which is extended by the
        tokens before `end` (default: all) that it has not seen yet."""
        tokens = seq.token_ids
        end = len(tokens) if end is None else end
        index = spec_state(seq).ngram
        if index.num_indexed > end:  # never expected (tokens only grow), but never trust a stale index
            index.num_indexed, index.grams = 0, {}
        grams = index.grams
        # An n-gram starting at s is indexed once its following token (at s + n) exists.
        for n in range(self.min_ngram, self.max_ngram + 1):
            table = grams.setdefault(n, {})
            for start in range(max(0, index.num_indexed - n), end - n):
                table[tuple(tokens[start : start + n])] = start
        index.num_indexed = end
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            start = grams[n].get(tuple(tokens[end - n : end]))
            if start is not None:
                return tokens[start + n : min(start + n + k, end)]
        return []

    def pending_tokens(self, seq: Sequence) -> int:
        return 0

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        return [Proposal(self.indexed_lookup(seq, k) if k > 0 else [], requested=k) for seq, k in zip(seqs, ks)]

    def on_verified(self, seq: Sequence) -> None:
        pass
