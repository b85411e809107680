"""Serving whole requests with a small model inside the engine step (tpserve.route): every piece of
glue between the engine and the small model's runner, the router and the audit.

The small model runs on rank 0, unsharded; its runner's K/V cache has the target's block count and
size, so the target's block tables index it and one block manager serves both. Per step the engine
calls, in order: `split` (the target's items, the small model's, and the `gap` requests whose
target prefill ends this step), `run` after the target's forward (the small model's rows, and its
pass over the `gap` prompts beside the target), `record_sampled` after sampling (the small model's
log-probability of each token it emitted, for the cascade), `before_update` (decisions after a
prefill: a `confidence` request sent to the target drops its token) and `after_update` (hand-overs
and switches). A finished request goes through `on_finished` (counts, the audit's sampling); the
audit's background sequences come back through `finish_background`.
"""

from __future__ import annotations

import collections
import uuid

import torch

from tpserve.engine.outputs import RouteStats
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from tpserve.engine.sequence import SMALL, TARGET, Sequence
from tpserve.engine.step import SeqWork, StepPlan
from tpserve.errors import InvalidRequest
from tpserve.route.audit import AuditInfo, AuditTotals, audit_result, audit_window
from tpserve.route.router import AUTO, RouteState


class SmallModel:
    def __init__(self, runner, router, scheduler, vocab_size: int, tokenizer, add_sequence) -> None:
        """router: a tpserve.route.Router (its policy None: `auto` means the target); add_sequence:
        the engine's, for the audit's background sequences."""
        self.runner = runner
        self.router = router
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.add_sequence = add_sequence
        self.audit_totals = AuditTotals()
        self.recent_audits: collections.deque = collections.deque(maxlen=256)  # the latest AuditResults
        self.num_requests = 0  # requests the small model finished
        self.num_generation_tokens = 0

    # --- arrival ------------------------------------------------------------------------------
    def start(self, seq: Sequence) -> None:
        """An `auto` request gets its first model from the router; scoring requests (prompt
        logprobs, max_tokens 0) are the target's."""
        route, router = seq.route, self.router
        if route is None or route.policy != AUTO:
            return
        scoring = seq.params.prompt_logprobs is not None or seq.params.max_tokens == 0
        if router.config.policy is None or scoring:
            seq.route, seq.model = None, TARGET
        else:
            route.policy = router.config.policy
            seq.model = router.start(route, seq.num_prompt_tokens)

    # --- a step -------------------------------------------------------------------------------
    def lookahead(self, spec, running: list[Sequence]):
        """Speculation's lookahead per sequence; small-served sequences never speculate."""
        lookahead = spec.plan_step([s for s in running if s.model != SMALL])
        return lambda seq: 0 if seq.model == SMALL else lookahead(seq)

    @staticmethod
    def split(batch: SchedulerOutput) -> tuple[SchedulerOutput, list[ScheduledSeq], list[ScheduledSeq]]:
        """(the target's items, the small model's, the `gap` items whose target prefill ends this
        step). The batch is reordered target first: the logit rows come in that order."""
        small = [item for item in batch.scheduled if item.seq.model == SMALL]
        target = batch
        if small:
            target = SchedulerOutput([item for item in batch.scheduled if item.seq.model != SMALL])
            batch.scheduled = target.scheduled + small
        beside = [item for item in target.scheduled
                  if item.samples and item.seq.route is not None and item.seq.route.policy == "gap"
                  and not item.seq.route.decided]
        return target, small, beside

    def run(self, items: list[ScheduledSeq], beside: list[ScheduledSeq]) -> torch.Tensor:
        """The small model's forward on rank 0 over its sequences' new tokens, and over the whole
        prompt of each `beside` item, whose tail it scores. Returns the small sequences' logit rows.
        Every pass sends whole block tables, which the runner forgets afterwards (it may also be
        the draft)."""
        works = []
        for item in items:
            seq = item.seq
            start = seq.num_computed_tokens
            rows = item.num_logit_rows
            works.append(SeqWork(seq.seq_id, seq.token_ids[start : start + item.num_new_tokens], start,
                                 block_table=list(seq.block_table), sample=rows > 0, num_logits=rows))
        num_rows = sum(item.num_logit_rows for item in items)
        tails = []
        for item in beside:
            seq = item.seq
            k = min(seq.route.tail_tokens, seq.num_prompt_tokens - 1)
            tails.append(k)
            works.append(SeqWork(seq.seq_id, seq.token_ids[: seq.num_prompt_tokens], 0,
                                 block_table=list(seq.block_table), num_logits=k + 1))
        logits = self.runner.execute(StepPlan(works))
        self.runner.forget_block_tables()
        if logits is None:  # no row sampled
            return torch.empty(0, self.vocab_size, device=self.runner.device)
        row = num_rows
        for item, k in zip(beside, tails):
            seq = item.seq
            n = seq.num_prompt_tokens
            seq.route.tail_logprobs = token_logprob_rows(logits[row : row + k], seq.token_ids[n - k : n])
            row += k + 1
        return logits[:num_rows]

    @staticmethod
    def beside_tokens(beside: list[ScheduledSeq]) -> int:
        return sum(item.seq.num_prompt_tokens for item in beside)

    @staticmethod
    def record_sampled(plain: list[ScheduledSeq], rows: torch.Tensor, tokens: list[int]) -> None:
        """The raw log-probability of each token a routed small-served sequence sampled (`rows`:
        the plain items' logit rows, in order)."""
        routed = [i for i, item in enumerate(plain) if item.seq.model == SMALL and item.seq.route is not None]
        if not routed:
            return
        logp = rows[routed].log_softmax(dim=-1)
        index = torch.tensor([[tokens[i]] for i in routed], device=logp.device)
        for i, lp in zip(routed, logp.gather(-1, index).squeeze(-1).tolist()):
            plain[i].seq.route.output_logprobs.append(lp)

    def before_update(self, small: list[ScheduledSeq], beside: list[ScheduledSeq]
                      ) -> tuple[list[Sequence], list[Sequence]]:
        """Decisions once a prompt is scored: (the `confidence` requests sent to the target, which
        lose the token the small model just sampled; the `gap` requests sent to the small model)."""
        to_target = []
        for item in small:
            route = item.seq.route
            if route is None or not item.tokens or route.policy == "gap":
                continue
            if self.router.after_prefill(route) == TARGET:
                item.tokens, item.logprobs = (), ()
                to_target.append(item.seq)
        to_small = [item.seq for item in beside if item.tokens and self.router.after_prefill(item.seq.route) == SMALL]
        return to_target, to_small

    def after_update(self, small: list[ScheduledSeq], to_target: list[Sequence], to_small: list[Sequence]) -> None:
        """Hand-overs to the target (`confidence` now, `cascade` once its tokens are scored), and
        `gap` requests continuing on the small model's K/V, which is already in their blocks."""
        for item in small:
            seq, route = item.seq, item.seq.route
            if seq in to_target or (route is not None and item.tokens
                                    and self.router.after_tokens(route, seq.is_finished) == TARGET
                                    and not seq.is_finished):
                route.handed_over, route.tail_tokens = True, 0
                self.scheduler.hand_over(seq, TARGET)
        for seq in to_small:
            if not seq.is_finished:  # (one that the target's first token ended stays the target's)
                seq.route.handed_over, seq.route.output_offset = True, seq.num_output_tokens
                self.scheduler.continue_on(seq, SMALL)

    # --- finished requests and the audit ------------------------------------------------------
    def on_finished(self, seq: Sequence) -> None:
        if seq.model != SMALL:
            return
        self.num_requests += 1
        self.num_generation_tokens += seq.num_output_tokens
        if seq.finish_reason != "abort" and self.router.audits():
            offset = seq.route.output_offset if seq.route is not None else 0
            info = AuditInfo(seq.request_id, seq.num_prompt_tokens, offset,
                             audit_window(seq.num_prompt_tokens, self.router.config.tail_tokens))
            self._queue_audit(list(seq.token_ids), info, SMALL)

    def _queue_audit(self, ids: list[int], info: AuditInfo, model: str) -> None:
        """The small model's, then the target's, teacher-forced scoring of prompt + output, in the
        background (admitted only while nothing waits; never emitted)."""
        audit = Sequence(-1, f"audit-{uuid.uuid4().hex}", ids, SamplingParams(max_tokens=0, prompt_logprobs=1),
                         model=model, background=True)
        audit.route = RouteState("audit", audit=info)
        try:
            self.add_sequence(audit)
        except InvalidRequest:  # it cannot fit: skip this audit
            return

    def finish_background(self, seq: Sequence) -> None:
        """An audit sequence finished: queue the target's pass after the small model's, or compare."""
        if seq.finish_reason == "abort" or seq.prompt_logprobs is None:
            return
        info = seq.route.audit
        if seq.model == SMALL:
            info.small_logprobs = [lp.logprob for lp in seq.prompt_logprobs]
            self._queue_audit(seq.token_ids, info, TARGET)
            return
        tok = self.tokenizer
        bytes_of = (lambda ids: len(tok.decode(ids).encode())) if tok is not None else len
        result = audit_result(info, seq.token_ids, seq.prompt_logprobs, bytes_of)
        self.audit_totals.add(result)
        self.recent_audits.append(result)
        self.router.on_audit(result.window_small_bits, result.window_target_bits)

    # --- state --------------------------------------------------------------------------------
    def stats(self) -> RouteStats:
        r = self.router
        routing = r.config.policy is not None
        return RouteStats(
            policy=r.config.policy, threshold=r.threshold if routing else None,
            small_fraction=r.fraction if routing else None, num_auto=r.num_auto, num_to_small=r.num_to_small,
            num_to_target=r.num_to_target, num_handovers=self.scheduler.num_handovers,
            small_requests=self.num_requests, small_generation_tokens=self.num_generation_tokens,
            audit=self.audit_totals.summary() if self.audit_totals.num_audits else {},
        )

    def leftovers(self) -> dict[str, int]:
        return {"small_block_tables": len(self.runner.block_tables)}


def token_logprob_rows(rows, targets: list[int]) -> list[float]:
    """Row i's raw log-probability of targets[i]."""
    logp = rows.log_softmax(dim=-1)
    return logp.gather(-1, torch.tensor(targets, dtype=torch.long, device=logp.device).unsqueeze(-1)).squeeze(-1).tolist()


def score_tail(item: ScheduledSeq, rows) -> list[float]:
    """Raw log-probabilities of the prompt tokens a chunk's `num_tail_rows` leading logit rows
    score: they sit at the chunk's last positions before the prompt's last (position p scores
    token p + 1)."""
    seq = item.seq
    last = min(seq.num_computed_tokens + item.num_new_tokens, seq.num_prompt_tokens - 1)  # past the last row
    return token_logprob_rows(rows, seq.token_ids[last - item.num_tail_rows + 1 : last + 1])
