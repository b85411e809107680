"""Speculative decoding inside an engine step: every piece of glue between the engine and the
proposer, the verifier and the k controller.

Per step the engine calls, in order: `plan_step` (this step's k, and each decoding sequence's
lookahead, which the scheduler reserves), `propose` (sets each speculating item's proposal; the
target then computes logits at all k + 1 positions in the same forward as everything else),
`verify` (the tokens each speculating item emits), after the scheduler's update `after_update`
(per-request totals, the draft's valid positions, shadow verification while off), and once the
step's outputs are out `record_step` (the whole step's cost, for the controller). Rolled-back
positions need no cleanup in either KV cache: they lie past num_computed_tokens and are
overwritten before they are ever read. Everything per sequence lives in `seq.spec` (state.py);
`release`, run when a request finishes, gives back its shadow-verification place.
"""

from __future__ import annotations

import heapq

import torch

from tpserve.engine.sampler import process_logits
from tpserve.engine.scheduler import SchedulerOutput, ScheduledSeq
from tpserve.engine.sequence import Sequence
from tpserve.engine.spec_decode.controller import SpecController
from tpserve.engine.spec_decode.proposers import with_history
from tpserve.engine.spec_decode.rejection import verify_coupled, verify_greedy, verify_sampled
from tpserve.engine.spec_decode.shadow import ShadowVerifier
from tpserve.engine.spec_decode.state import SpecStats, SpecTotals, spec_state


class SpecDecoder:
    def __init__(self, proposer, controller: SpecController, max_model_len: int) -> None:
        self.proposer = proposer
        self.controller = controller
        self.max_model_len = max_model_len
        self.totals = SpecTotals()
        self.shadow = (ShadowVerifier(proposer.indexed_lookup, controller.max_k, self._record_verification)
                       if proposer.free_proposals and controller.adaptive else None)
        self._k = 0  # this step's k, from plan_step
        self._passes: list[tuple[int, float]] = []  # the draft passes of this step's propose

    # --- before the forward -------------------------------------------------------------------
    def plan_step(self, running: list[Sequence]):
        """Choose this step's k from the running sequences that decode one token this step (not
        those recomputing after a preemption); returns each sequence's lookahead for the
        scheduler. When only some speculate (a probe), they are the ones cheapest for the proposer
        to catch up on. (A seeded request's tokens do not depend on k: verify_coupled.)"""
        decoding = [s for s in running if s.is_decoding and s.num_computed_tokens == s.num_tokens - 1]
        k, count = self.controller.choose_k([spec_state(s).acceptance for s in decoding])
        self._k = k
        speculating = None if count >= len(decoding) else set(
            heapq.nsmallest(count, decoding, key=self.proposer.pending_tokens))

        def lookahead(seq: Sequence) -> int:
            return k if speculating is None or seq in speculating else 0

        return lookahead

    def propose(self, batch: SchedulerOutput) -> None:
        """Give each item with lookahead its proposal (never past max_tokens or the model length)."""
        items = [item for item in batch.scheduled if item.num_lookahead > 0]
        self._passes = []
        if not items:
            return
        ks = [self._cap(item.seq, item.num_lookahead) for item in items]
        proposals = self.proposer.propose([item.seq for item in items], ks)
        self._passes = self.proposer.last_passes
        for item, k, proposal in zip(items, ks, proposals):
            if k > 0:
                item.proposal = proposal

    def _cap(self, seq: Sequence, k: int) -> int:
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(0, min(k, room))

    # --- after the forward --------------------------------------------------------------------
    def verify(self, items: list[tuple[ScheduledSeq, torch.Tensor]], sampler) -> None:
        """For each speculating item and its raw logits [k + 1, V] (at the last known token and at
        each proposal), set the tokens it emits and their logprobs. Logits processing runs once
        over all rows."""
        views = [with_history(item.seq, item.proposal.tokens[:i])
                 for item, _ in items for i in range(len(item.proposal.tokens) + 1)]
        processed = process_logits(torch.cat([rows for _, rows in items]), views, sampler.eos_token_ids)
        start = 0
        for item, rows in items:
            seq, proposal = item.seq, item.proposal
            props = proposal.tokens
            mine = processed[start : start + len(props) + 1]
            start += len(props) + 1
            if seq.params.greedy:
                tokens = verify_greedy(mine, props)
            elif seq.params.seed is not None:  # the position-keyed draws plain sampling would use
                noise = torch.stack([sampler.noise(seq, seq.num_tokens + i, rows.shape[-1])
                                     for i in range(len(props) + 1)]).to(rows.device)
                tokens = verify_coupled(mine.softmax(dim=-1), props, noise)
            else:
                draft_probs = proposal.draft_probs
                if draft_probs is None:  # deterministic proposer: one-hot draft distribution
                    draft_probs = torch.zeros(len(props), rows.shape[-1], device=rows.device)
                    draft_probs[torch.arange(len(props)), torch.tensor(props, dtype=torch.long)] = 1.0
                tokens = verify_sampled(mine.softmax(dim=-1), draft_probs, props, sampler.generator)
            if self.shadow is not None:
                self.shadow.forget(seq)
            self._record_verification(seq, len(tokens) - 1, proposal.requested)
            item.tokens = tokens
            item.logprobs = sampler.logprobs(rows[: len(tokens)], [seq] * len(tokens), tokens)

    def _record_verification(self, seq: Sequence, num_accepted: int, num_requested: int) -> None:
        self.controller.record_verification(spec_state(seq).acceptance, num_accepted, num_requested)

    def after_update(self, batch: SchedulerOutput) -> None:
        """After the scheduler's update: count what each item emitted, move the draft's valid
        positions back to what the target kept, and shadow-verify decoding sequences that did not
        speculate."""
        for item in batch.scheduled:
            if not item.tokens:
                continue
            seq = item.seq
            num_proposed = len(item.proposal.tokens) if item.proposal is not None else 0
            num_accepted = len(item.tokens) - 1 if item.proposal is not None else 0
            self.totals.add(num_proposed, num_accepted, len(item.tokens))
            spec_state(seq).totals.add(num_proposed, num_accepted, len(item.tokens))
            if seq.is_finished:
                continue
            if item.proposal is not None:
                self.proposer.on_verified(seq)
            elif item.decoding and item.num_new_tokens == 1 and self.shadow is not None:
                self.shadow.observe(seq, len(item.tokens))

    def record_step(self, batch: SchedulerOutput, seconds: float) -> None:
        """The whole engine step took `seconds`; a step in which every sequence decoded one token
        (with or without proposals) tells the controller what this step's k costs on this machine."""
        passes, self._passes = self._passes, []
        if all(item.decoding and item.num_new_tokens == 1 for item in batch.scheduled):
            num_spec = sum(item.proposal is not None for item in batch.scheduled)
            emitted = sum(len(item.tokens) for item in batch.scheduled)
            self.controller.record_step(len(batch.scheduled), self._k, num_spec, emitted, seconds, passes)

    # --- lifecycle ----------------------------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        """A request finished (any way): give up its shadow-verification place at once."""
        if self.shadow is not None:
            self.shadow.forget(seq)

    @staticmethod
    def request_stats(seq: Sequence) -> SpecStats | None:
        """A request's speculation counts (None if it never emitted a token)."""
        return seq.spec.totals.stats() if seq.spec is not None and seq.spec.totals.num_target_forwards else None

    def leftovers(self) -> dict[str, int]:
        """What speculation holds for sequences (zero once every sequence has finished)."""
        runner = getattr(self.proposer, "runner", None)  # a draft model's
        return {"shadow_tracked": self.shadow.num_tracked if self.shadow is not None else 0,
                "draft_block_tables": len(runner.block_tables) if runner is not None else 0}
