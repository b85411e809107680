"""Speculative decoding inside an engine step: propose before the target forward, verify after.

The engine asks `plan_k` for this step's k, lets the scheduler reserve k lookahead slots per
decoding sequence, calls `propose` for those sequences, appends the proposals to their SeqWork
(the target then computes logits at all k + 1 positions in the same forward as everything else),
and finally `verify`s each sequence's rows. Rolled-back positions need no cleanup in either KV
cache: they lie past num_computed_tokens and are overwritten before they are ever read. Decoding
sequences that did not speculate are `observe`d: with free proposals (n-gram lookup) and an
adaptive controller, their shadow verifications keep the acceptance estimate current while off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpserve.engine.sampler import process_logits
from tpserve.engine.sequence import Sequence
from tpserve.engine.spec_decode.controller import SpecController
from tpserve.engine.spec_decode.proposers import Proposal, with_history
from tpserve.engine.spec_decode.rejection import verify_greedy, verify_sampled
from tpserve.engine.spec_decode.shadow import ShadowVerifier


@dataclass
class SpecTotals:
    num_proposed: int = 0
    num_accepted: int = 0
    num_spec_steps: int = 0  # sequence-steps that verified at least one proposal
    num_target_forwards: int = 0  # sequence-steps that produced tokens
    num_output_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "num_proposed_tokens": self.num_proposed,
            "num_accepted_tokens": self.num_accepted,
            "num_target_forwards": self.num_target_forwards,
            "acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
            "mean_accepted_length": self.num_accepted / self.num_spec_steps if self.num_spec_steps else 0.0,
            "tokens_per_target_forward": (self.num_output_tokens / self.num_target_forwards
                                          if self.num_target_forwards else 0.0),
        }


class SpecDecoder:
    def __init__(self, proposer, controller: SpecController, max_model_len: int) -> None:
        self.proposer = proposer
        self.controller = controller
        self.max_model_len = max_model_len
        self.totals = SpecTotals()
        self.per_seq: dict[int, SpecTotals] = {}
        self._passes: list[tuple[int, float]] = []  # the draft passes of this step's propose
        self.shadow = (ShadowVerifier(proposer.indexed_lookup, controller.max_k, controller.record_verification)
                       if proposer.free_proposals and controller.adaptive else None)

    def plan_k(self, decoding: list[int]) -> tuple[int, int]:
        """decoding: ids of the decoding sequences -> (k, how many of them speculate this step)."""
        return self.controller.choose_k(decoding)

    def observe(self, seq: Sequence, num_new: int) -> None:
        """A decoding sequence emitted `num_new` tokens without speculating."""
        if self.shadow is not None:
            self.shadow.observe(seq, num_new)

    def cap(self, seq: Sequence, k: int) -> int:
        """Never propose past max_tokens or the max model length."""
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(0, min(k, room))

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        proposals = self.proposer.propose(seqs, ks)
        self._passes = self.proposer.last_passes
        return proposals

    def record_step(self, num_seqs: int, k: int, num_spec: int, tokens: int, seconds: float) -> None:
        """Called once per decode-only step, after `propose` if the step proposed anything."""
        passes, self._passes = self._passes, []
        self.controller.record_step(num_seqs, k, num_spec, tokens, seconds, passes)

    def verify(self, batch: list[tuple[Sequence, torch.Tensor, Proposal, torch.Generator]],
               eos_token_ids: tuple[int, ...]) -> list[list[int]]:
        """For each (seq, raw logits [k + 1, V] at the last token and each proposal, proposal,
        generator) -> the tokens to emit. Logits processing runs once over all rows."""
        views = [with_history(seq, prop.tokens[:i]) for seq, _, prop, _ in batch for i in range(len(prop.tokens) + 1)]
        processed = process_logits(torch.cat([rows for _, rows, _, _ in batch]), views, eos_token_ids)
        out, start = [], 0
        for seq, rows, proposal, generator in batch:
            props = proposal.tokens
            mine = processed[start : start + len(props) + 1]
            start += len(props) + 1
            if seq.params.greedy:
                tokens = verify_greedy(mine, props)
            else:
                draft_probs = proposal.draft_probs
                if draft_probs is None:  # deterministic proposer: one-hot draft distribution
                    draft_probs = torch.zeros(len(props), rows.shape[-1], device=rows.device)
                    draft_probs[torch.arange(len(props)), torch.tensor(props, dtype=torch.long)] = 1.0
                tokens = verify_sampled(mine.softmax(dim=-1), draft_probs, props, generator)
            if self.shadow is not None:
                self.shadow.forget(seq.seq_id)
            self.controller.record_verification(seq.seq_id, len(tokens) - 1, proposal.requested)
            out.append(tokens)
        return out

    def account(self, seq: Sequence, num_proposed: int, num_accepted: int, num_emitted: int) -> None:
        for totals in (self.totals, self.per_seq.setdefault(seq.seq_id, SpecTotals())):
            totals.num_proposed += num_proposed
            totals.num_accepted += num_accepted
            totals.num_spec_steps += 1 if num_proposed else 0
            totals.num_target_forwards += 1
            totals.num_output_tokens += num_emitted

    def finish(self, seq: Sequence) -> dict | None:
        self.proposer.release(seq.seq_id)
        self.controller.release(seq.seq_id)
        if self.shadow is not None:
            self.shadow.forget(seq.seq_id)
        totals = self.per_seq.pop(seq.seq_id, None)
        return totals.as_dict() if totals else None
