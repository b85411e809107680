"""Rank 0's engine: sequences in, per-step streamed outputs out.

A sequence arrives validated and whole (tpserve.server.requests makes it; a server does so on its
front-end thread);
`add_sequence` gives it an id and queues it. Each `step()` is schedule -> execute -> update ->
emit: the scheduler plans the step (speculation reserves its lookahead first and proposes after),
every rank runs the forward, rank 0 samples (speculation verifies its rows), the scheduler
applies the result and finishes requests, and the engine emits each updated request's new output.
Finishing or aborting a request is one path, `Scheduler.finish` (which also gives speculation its
say at once); emitting the finished request removes it from the engine, and `leftovers()` shows
that nothing stays behind.
"""

from __future__ import annotations

import collections
import itertools
import uuid
import time

import torch

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.outputs import EngineStats, RequestOutput, RouteOutcome, RouteStats
from tpserve.engine.sampler import Sampler, TokenLogprobs, token_logprobs
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import ScheduledSeq, SchedulerConfig, SchedulerOutput, Scheduler
from tpserve.engine.sequence import SMALL, TARGET, Sequence
from tpserve.engine.step import SeqWork, StepPlan
from tpserve.errors import InvalidRequest
from tpserve.route.audit import AuditInfo, AuditTotals, audit_result, audit_window
from tpserve.route.router import AUTO, RouteState


class LLMEngine:
    def __init__(
        self,
        driver,
        vocab_size: int,
        num_blocks: int,
        block_size: int,
        scheduler_config: SchedulerConfig,
        tokenizer=None,
        eos_token_ids: tuple[int, ...] = (),
        enable_prefix_caching: bool = True,
        seed: int = 0,
        spec=None,
        small_runner=None,
        router=None,
    ) -> None:
        """small_runner: the small model's ModelRunner on rank 0 (unsharded; its K/V cache is
        indexed by the same block tables), serving requests routed to it; router: a
        tpserve.route.Router for `auto` requests and the audit."""
        self.driver = driver
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, self.eos_token_ids, self._on_finish)
        self.sampler = Sampler(self.eos_token_ids, seed)
        self.spec = spec  # SpecDecoder or None
        self.small_runner = small_runner
        self.router = router
        self.audit_totals = None  # tpserve.route.audit.AuditTotals once the router audits
        self.recent_audits: collections.deque = collections.deque(maxlen=256)  # the latest AuditResults
        self.num_small_requests = 0
        self.num_small_generation_tokens = 0
        self._seq_ids = itertools.count()
        self._requests: dict[str, Sequence] = {}  # live requests by request id (for aborts)
        self._aborted: list[Sequence] = []  # finished outside step(); the next step emits them
        self.num_steps = 0
        self.last_step_num_tokens = 0
        self.last_step_num_seqs = 0
        self.kv_blocks_in_use_peak = 0  # the most blocks in use right after a step's scheduling, since start

    # --- requests -----------------------------------------------------------------------------
    def add_sequence(self, seq: Sequence) -> None:
        """Engine thread only: start scheduling a sequence made by the request factory."""
        if seq.request_id in self._requests:
            raise InvalidRequest(f"request id {seq.request_id!r} is already in use")
        self._route_start(seq)
        self.scheduler.add(seq)
        seq.seq_id = next(self._seq_ids)
        self._requests[seq.request_id] = seq

    def _route_start(self, seq: Sequence) -> None:
        """An `auto` request gets its first model from the router (the target without one)."""
        route, router = seq.route, self.router
        if route is not None and route.policy == AUTO:
            scoring = seq.params.prompt_logprobs is not None or seq.params.max_tokens == 0
            if router is None or router.config.policy is None or scoring:  # scoring is the target's
                seq.route, seq.model = None, TARGET
            else:
                route.policy = router.config.policy
                seq.model = router.start(route, seq.num_prompt_tokens)
        if seq.model == SMALL and self.small_runner is None:
            raise InvalidRequest("this server has no small model (start it with --small-model DIR)")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, "abort")
        self._aborted.append(seq)
        return True

    def has_work(self) -> bool:
        """Requests to run, outputs to emit, or worker tables to drop."""
        return bool(self._requests) or self.scheduler.num_tables_to_drop > 0

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    # --- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> execute -> update -> emit."""
        started = time.perf_counter()
        batch = self.scheduler.schedule(self._lookahead())
        self.kv_blocks_in_use_peak = max(self.kv_blocks_in_use_peak, self.block_manager.num_in_use_blocks)
        updated = []
        target = batch
        if batch.scheduled:
            small = [item for item in batch.scheduled if item.seq.model == SMALL]
            if small:  # target rows first, then the small model's: the logits come in that order
                target = SchedulerOutput([item for item in batch.scheduled if item.seq.model != SMALL])
                batch.scheduled = target.scheduled + small
            # `gap` requests ending their prefill on the target: the small model computes the prompt beside it.
            beside = [item for item in target.scheduled
                      if item.samples and item.seq.route is not None and item.seq.route.policy == "gap"
                      and not item.seq.route.decided]
            if self.spec is not None:
                self.spec.propose(target)
            # The target's plan goes out even when empty: workers learn which tables to drop and
            # keep hearing from rank 0 while only the small model runs.
            logits = self.driver.step(self.scheduler.plan(target))
            if small or beside:
                small_logits = self._run_small(small, beside)
                logits = small_logits if logits is None else torch.cat([logits, small_logits])
            self.num_steps += 1
            self.last_step_num_tokens = batch.num_tokens + sum(item.seq.num_computed_tokens + item.num_new_tokens
                                                               for item in beside)
            self.last_step_num_seqs = len(batch.scheduled)
            self._sample(batch, logits)
            to_target = self._route_before_update(small) if small else []
            to_small = self._route_gap(beside)
            updated = self.scheduler.update(batch, time.monotonic())
            if self.spec is not None:
                self.spec.after_update(target)
            if small:
                self._route_after_update(small, to_target)
            for seq in to_small:  # its blocks hold the small model's K/V of the prompt too
                if not seq.is_finished:
                    seq.route.handed_over, seq.route.output_offset = True, seq.num_output_tokens
                    self.scheduler.continue_on(seq, SMALL)
        elif self.scheduler.num_tables_to_drop:
            self.driver.step(StepPlan(finished=self.scheduler.take_tables_to_drop()))
        outputs = self._emit(updated)
        if self.spec is not None and target.scheduled:
            self.spec.record_step(target, time.perf_counter() - started)
        return outputs

    def _lookahead(self):
        """Speculation's lookahead per sequence; small-served sequences never speculate."""
        if self.spec is None:
            return 0
        if self.small_runner is None:
            return self.spec.plan_step(self.scheduler.running)
        lookahead = self.spec.plan_step([s for s in self.scheduler.running if s.model != SMALL])
        return lambda seq: 0 if seq.model == SMALL else lookahead(seq)

    def _run_small(self, items: list[ScheduledSeq], beside: list[ScheduledSeq] = ()) -> torch.Tensor:
        """The small model's forward on rank 0 over its sequences' new tokens, and over the whole
        prompt of each `beside` item (a `gap` request the target is prefilling), whose tail rows it
        scores. Returns the small sequences' logit rows. Every pass sends whole block tables, which
        its runner forgets afterwards (it may also be the draft)."""
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
        logits = self.small_runner.execute(StepPlan(works))
        self.small_runner.forget_block_tables()
        if logits is None:  # no row sampled
            return torch.empty(0, self.vocab_size, device=self.small_runner.device)
        row = num_rows
        for item, k in zip(beside, tails):
            seq = item.seq
            seq.route.tail_logprobs = token_logprob_rows(logits[row : row + k],
                                                         seq.token_ids[seq.num_prompt_tokens - k : seq.num_prompt_tokens])
            row += k + 1
        return logits[:num_rows]

    def _route_gap(self, beside: list[ScheduledSeq]) -> list[Sequence]:
        """`gap` requests whose prompt both models have scored: those the router sends to the
        small model (which continues after the target's first token)."""
        if self.router is None:
            return []
        return [item.seq for item in beside if item.tokens and self.router.after_prefill(item.seq.route) == SMALL]

    def _route_before_update(self, items: list[ScheduledSeq]) -> list[Sequence]:
        """After sampling the small model's rows: keep the raw log-probabilities routing needs; a
        `confidence` request the router sends to the target loses the token the small model just
        sampled (the target serves it whole). Returns those sequences."""
        to_target = []
        for item in items:
            route = item.seq.route
            if route is None or not item.tokens or route.policy == "gap":
                continue
            if self.router is not None and self.router.after_prefill(route) == TARGET:
                item.tokens, item.logprobs = (), ()
                to_target.append(item.seq)
        return to_target

    def _route_after_update(self, items: list[ScheduledSeq], to_target: list[Sequence]) -> None:
        for item in items:
            seq = item.seq
            route = seq.route
            if seq in to_target:
                route.handed_over, route.tail_tokens = True, 0
                self.scheduler.hand_over(seq, TARGET)
                continue
            if route is None or not item.tokens or self.router is None:
                continue
            if self.router.after_tokens(route, seq.is_finished) == TARGET and not seq.is_finished:
                route.handed_over, route.tail_tokens = True, 0
                self.scheduler.hand_over(seq, TARGET)

    def _sample(self, batch: SchedulerOutput, logits) -> None:
        """Set each sampling item's tokens: one for a plain sequence; for a speculating one, its
        accepted proposals and one more (verified by the SpecDecoder); and the prompt logprobs a
        scoring chunk computed. Logit rows come in plan order, `num_logit_rows` per item."""
        plain, plain_rows, speculating, row = [], [], [], 0
        for item in batch.scheduled:
            start, row = row, row + item.num_logit_rows  # a view is made only where rows are read
            if item.scores_prompt:
                item.prompt_logprobs = score_prompt(item, logits[start:row])
            if item.num_tail_rows:
                item.seq.route.tail_scored(item.seq.model).extend(score_tail(item, logits[start : start + item.num_tail_rows]))
            if not item.samples or item.seq.params.max_tokens == 0:
                continue
            if item.proposal is None:
                plain.append(item)
                plain_rows.append(row - 1)
            else:
                speculating.append((item, logits[start:row]))
        if plain:
            tokens, lps = self.sampler.sample(logits[plain_rows], [item.seq for item in plain])
            for item, token, lp in zip(plain, tokens, lps):
                item.tokens, item.logprobs = [token], [lp]
            routed = [(i, item) for i, item in enumerate(plain) if item.seq.model == SMALL and item.seq.route is not None]
            if routed:  # the small model's raw log-probability of each token it emits
                rows = logits[[plain_rows[i] for i, _ in routed]].log_softmax(dim=-1)
                index = torch.tensor([[tokens[i]] for i, _ in routed], device=rows.device)
                chosen = rows.gather(-1, index).squeeze(-1).tolist()
                for (_, item), lp in zip(routed, chosen):
                    item.seq.route.output_logprobs.append(lp)
        if speculating:
            self.spec.verify(speculating, self.sampler)

    def _emit(self, updated: list[Sequence]) -> list[RequestOutput]:
        """Each updated request's new output, aborted ones first; a finished request leaves the
        engine here."""
        seqs, self._aborted = self._aborted + updated, []
        outputs = []
        for seq in seqs:
            if seq.background:  # internal (a routing audit): never emitted
                if seq.is_finished:
                    del self._requests[seq.request_id]
                    self._finish_audit(seq)
                continue
            outputs.append(self._output(seq))
        return outputs

    def _output(self, seq: Sequence) -> RequestOutput:
        num_prompt, num_output, finished = seq.num_prompt_tokens, seq.num_output_tokens, seq.is_finished
        times = seq.times
        ttft = None if times.first_token is None else times.first_token - times.arrival
        text = "" if seq.detokenizer is None else seq.detokenizer.delta(finished=finished)
        out = RequestOutput(seq.request_id, seq.token_ids[num_prompt + seq.num_emitted_tokens :], text,
                            seq.unsent_logprobs, finished, seq.finish_reason, num_prompt, num_output,
                            seq.num_cached_tokens, ttft)
        seq.num_emitted_tokens = num_output
        seq.unsent_logprobs = []
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent \
                and len(seq.prompt_logprobs) == num_prompt - 1:
            out.prompt_logprobs = [None, *seq.prompt_logprobs]  # the first prompt token has none
            seq.prompt_logprobs_sent = True
        out.model = seq.model
        if finished:
            del self._requests[seq.request_id]
            out.times = seq.times
            if self.spec is not None:
                out.speculation = self.spec.request_stats(seq)
            route = seq.route
            if route is not None and route.policy is not None:
                out.route = RouteOutcome(route.policy, route.score, route.threshold, route.handed_over)
            if seq.model == SMALL:
                self.num_small_requests += 1
                self.num_small_generation_tokens += num_output
                if seq.finish_reason != "abort" and self.router is not None and self.router.audits():
                    self._start_audit(seq)
        return out

    # --- the routing audit --------------------------------------------------------------------
    def _start_audit(self, seq: Sequence) -> None:
        """Queue the small model's, then the target's, teacher-forced scoring of a finished
        small-served request's prompt + output, in the background (admitted only while nothing
        waits; never emitted). The comparison feeds `audit_totals` and the router."""
        offset = seq.route.output_offset if seq.route is not None else 0
        info = AuditInfo(seq.request_id, seq.num_prompt_tokens, offset,
                         audit_window(seq.num_prompt_tokens, self.router.config.tail_tokens))
        self._queue_audit(list(seq.token_ids), info, SMALL)

    def _queue_audit(self, ids: list[int], info: AuditInfo, model: str) -> None:
        audit = Sequence(-1, f"audit-{uuid.uuid4().hex}", ids, SamplingParams(max_tokens=0, prompt_logprobs=1),
                         model=model, background=True)
        audit.route = RouteState("audit", audit=info)
        try:
            self.add_sequence(audit)
        except InvalidRequest:  # it cannot fit: skip this audit
            return

    def _finish_audit(self, seq: Sequence) -> None:
        if seq.finish_reason == "abort" or seq.prompt_logprobs is None:
            return
        info = seq.route.audit
        if seq.model == SMALL:  # the small model's pass is done: the target's next
            info.small_logprobs = [lp.logprob for lp in seq.prompt_logprobs]
            self._queue_audit(seq.token_ids, info, TARGET)
            return
        tok = self.tokenizer
        bytes_of = (lambda ids: len(tok.decode(ids).encode())) if tok is not None else len
        result = audit_result(info, seq.token_ids, seq.prompt_logprobs, bytes_of)
        if self.audit_totals is None:
            self.audit_totals = AuditTotals()
        self.audit_totals.add(result)
        self.recent_audits.append(result)
        if self.router is not None:
            self.router.on_audit(result.window_small_bits, result.window_target_bits)

    def _on_finish(self, seq: Sequence) -> None:
        """Run by Scheduler.finish, the one way a request ends."""
        if self.spec is not None:
            self.spec.release(seq)

    # --- state --------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            kv_blocks_free=bm.num_free_blocks, kv_blocks_cached=bm.num_cached_blocks,
            kv_blocks_in_use=bm.num_in_use_blocks, kv_blocks_total=bm.num_blocks,
            prefix_cache_hit_rate=bm.hit_rate, num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps, speculation=self.spec.totals.stats() if self.spec is not None else None,
            num_prompt_tokens=self.scheduler.num_prompt_tokens, num_generation_tokens=self.scheduler.num_generation_tokens,
            prefix_cache_queries=bm.num_queried_tokens, prefix_cache_hits=bm.num_hit_tokens,
            spec_num_drafts=self.spec.totals.num_spec_steps if self.spec is not None else 0,
            spec_accepted_by_position=tuple(self.spec.totals.accepted_by_position) if self.spec is not None else (),
            last_step_num_tokens=self.last_step_num_tokens, kv_blocks_in_use_peak=self.kv_blocks_in_use_peak,
            routing=self.route_stats() if self.small_runner is not None else None,
        )

    def route_stats(self) -> RouteStats:
        r = self.router
        return RouteStats(
            policy=r.config.policy if r is not None else None,
            threshold=r.threshold if r is not None and r.config.policy is not None else None,
            small_fraction=r.fraction if r is not None and r.config.policy is not None else None,
            num_auto=r.num_auto if r is not None else 0, num_to_small=r.num_to_small if r is not None else 0,
            num_to_target=r.num_to_target if r is not None else 0, num_handovers=self.scheduler.num_handovers,
            small_requests=self.num_small_requests, small_generation_tokens=self.num_small_generation_tokens,
            audit=self.audit_totals.summary() if self.audit_totals is not None else {},
        )

    def leftovers(self) -> dict[str, int]:
        """What the engine still holds for requests, by kind, counted where it is held (the
        worker tables in rank 0's runner, which mirrors every rank's); empty when no request is
        live and every finished one left nothing behind."""
        held = {
            "requests": len(self._requests),
            "waiting": len(self.scheduler.waiting),
            "background": len(self.scheduler.background),
            "running": len(self.scheduler.running),
            "kv_blocks_in_use": self.block_manager.num_in_use_blocks,
            "worker_block_tables": len(self.driver.runner.block_tables),
            "tables_to_drop": self.scheduler.num_tables_to_drop,
            "outputs_to_emit": len(self._aborted),
            **(self.spec.leftovers() if self.spec is not None else {}),
            "small_block_tables": len(self.small_runner.block_tables) if self.small_runner is not None else 0,
        }
        return {kind: n for kind, n in held.items() if n}

    def heartbeat(self) -> None:
        self.driver.heartbeat()

    def shutdown(self) -> None:
        self.driver.shutdown()


def score_prompt(item: ScheduledSeq, rows) -> list[TokenLogprobs]:
    """Prompt logprobs from a prefill chunk's logit rows [num_new_tokens, V]: the row at position p
    scores prompt token p + 1, for the positions not scored yet."""
    seq = item.seq
    start = seq.num_computed_tokens
    first, end = len(seq.prompt_logprobs), min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
    targets = seq.token_ids[first + 1 : end + 1]
    return token_logprobs(rows[first - start : end - start], targets, [seq.params.prompt_logprobs] * len(targets))


def score_tail(item: ScheduledSeq, rows) -> list[float]:
    """Raw log-probabilities of the prompt tokens a chunk's `num_tail_rows` leading logit rows
    score: they sit at the chunk's last positions before the prompt's last (position p scores
    token p + 1)."""
    seq = item.seq
    last = min(seq.num_computed_tokens + item.num_new_tokens, seq.num_prompt_tokens - 1)  # past the last row
    return token_logprob_rows(rows, seq.token_ids[last - item.num_tail_rows + 1 : last + 1])


def token_logprob_rows(rows, targets: list[int]) -> list[float]:
    """Row i's raw log-probability of targets[i]."""
    logp = rows.log_softmax(dim=-1)
    return logp.gather(-1, torch.tensor(targets, dtype=torch.long, device=logp.device).unsqueeze(-1)).squeeze(-1).tolist()
