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

import itertools
import time

import torch

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.outputs import EngineStats, RequestOutput, RouteOutcome
from tpserve.engine.sampler import Sampler, TokenLogprobs, token_logprobs
from tpserve.engine.scheduler import ScheduledSeq, SchedulerConfig, SchedulerOutput, Scheduler
from tpserve.engine.sequence import SMALL, Sequence
from tpserve.engine.small_model import score_tail
from tpserve.engine.step import StepPlan
from tpserve.errors import InvalidRequest
from tpserve.route.router import AUTO


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
    ) -> None:
        self.driver = driver
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, self.eos_token_ids, self._on_finish)
        self.sampler = Sampler(self.eos_token_ids, seed)
        self.spec = spec  # SpecDecoder or None
        self.small = None  # SmallModel (tpserve/engine/small_model.py) with --small-model, set by setup
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
        if self.small is not None:
            self.small.start(seq)
        elif seq.route is not None and seq.route.policy == AUTO:
            seq.route = None  # no small model: `auto` means the target
        if seq.model == SMALL and self.small is None:
            raise InvalidRequest("this server has no small model (start it with --small-model DIR)")
        self.scheduler.add(seq)
        seq.seq_id = next(self._seq_ids)
        self._requests[seq.request_id] = seq

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
        target, small, beside = batch, [], []
        if batch.scheduled:
            if self.small is not None:
                target, small, beside = self.small.split(batch)
            if self.spec is not None:
                self.spec.propose(target)
            # The target's plan goes out even when empty: workers learn which tables to drop and
            # keep hearing from rank 0 while only the small model runs.
            logits = self.driver.step(self.scheduler.plan(target))
            if small or beside:  # the small model's rows follow the target's
                small_logits = self.small.run(small, beside)
                logits = small_logits if logits is None else torch.cat([logits, small_logits])
            self.num_steps += 1
            self.last_step_num_tokens = batch.num_tokens + (self.small.beside_tokens(beside) if beside else 0)
            self.last_step_num_seqs = len(batch.scheduled)
            failed = mark_nonfinite(batch, logits)
            self._sample(batch, logits)
            to_target, to_small = self.small.before_update(small, beside) if small or beside else ([], [])
            updated = self.scheduler.update(batch, time.monotonic())
            if self.spec is not None:
                self.spec.after_update(target)
            if small or to_small:
                self.small.after_update(small, to_target, to_small)
            for item in failed:  # after the update, which left them as if they had sampled nothing
                self._fail_request(item.seq, updated)
        elif self.scheduler.num_tables_to_drop:
            self.driver.step(StepPlan(finished=self.scheduler.take_tables_to_drop()))
        outputs = self._emit(updated)
        if self.spec is not None and target.scheduled:
            self.spec.record_step(target, time.perf_counter() - started)
        return outputs

    def _lookahead(self):
        if self.spec is None:
            return 0
        if self.small is not None:
            return self.small.lookahead(self.spec, self.scheduler.running)
        return self.spec.plan_step(self.scheduler.running)

    def _sample(self, batch: SchedulerOutput, logits) -> None:
        """Set each sampling item's tokens: one for a plain sequence; for a speculating one, its
        accepted proposals and one more (verified by the SpecDecoder); and the prompt logprobs a
        scoring chunk computed. Logit rows come in plan order, `num_logit_rows` per item."""
        plain, plain_rows, speculating, row = [], [], [], 0
        for item in batch.scheduled:
            start, row = row, row + item.num_logit_rows  # a view is made only where rows are read
            if item.nonfinite:
                continue
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
            if self.small is not None:
                self.small.record_sampled(plain, logits[plain_rows], tokens)
        if speculating:
            self.spec.verify(speculating, self.sampler)

    def _fail_request(self, seq: Sequence, updated: list[Sequence]) -> None:
        """End one request whose logits turned non-finite; the batch goes on without it."""
        if seq.is_finished:
            return
        seq.error = (f"the model's logits for this request are not finite (NaN or infinity) after "
                     f"{seq.num_output_tokens} output tokens at position {seq.num_computed_tokens}; "
                     f"the request was stopped and the server goes on")
        self.scheduler.finish(seq, "error")
        if seq not in updated:  # (_emit removes a background one without emitting it)
            updated.append(seq)

    def _emit(self, updated: list[Sequence]) -> list[RequestOutput]:
        """Each updated request's new output, aborted ones first; a finished request leaves the
        engine here."""
        seqs, self._aborted = self._aborted + updated, []
        outputs = []
        for seq in seqs:
            if seq.background:  # internal (a routing audit): never emitted
                if seq.is_finished:
                    del self._requests[seq.request_id]
                    self.small.finish_background(seq)
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
        out.error = seq.error
        if finished:
            del self._requests[seq.request_id]
            out.times = seq.times
            if self.spec is not None:
                out.speculation = self.spec.request_stats(seq)
            route = seq.route
            if route is not None and route.policy is not None:
                out.route = RouteOutcome(route.policy, route.score, route.threshold, route.handed_over)
            if self.small is not None:
                self.small.on_finished(seq)
        return out

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
            routing=self.small.stats() if self.small is not None else None,
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
            **(self.small.leftovers() if self.small is not None else {}),
        }
        return {kind: n for kind, n in held.items() if n}

    def heartbeat(self) -> None:
        self.driver.heartbeat()

    @property
    def last_contact(self) -> float:
        """When rank 0 last sent the workers a message (a plan or a heartbeat), monotonic."""
        return self.driver.last_contact

    def shutdown(self) -> None:
        self.driver.shutdown()


def mark_nonfinite(batch: SchedulerOutput, logits) -> list[ScheduledSeq]:
    """The items whose logit rows hold a NaN or an infinity (one check over the whole batch; a
    request with a masked-out token has -inf only after sampling's processing, not here)."""
    if logits is None or not len(logits):
        return []
    # A NaN or an infinity makes its row's sum non-finite: one [rows] reduction instead of a
    # [rows, V] mask. Only rows whose sum is not finite are checked exactly (NaN propagates through
    # max and min, an infinity shows in one of them), since finite logits might overflow a sum.
    finite = torch.isfinite(logits.sum(dim=-1))
    if bool(finite.all()):
        return []
    finite = torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))
    if bool(finite.all()):
        return []
    failed, row = [], 0
    for item in batch.scheduled:
        start, row = row, row + item.num_logit_rows
        if row > start and not bool(finite[start:row].all()):
            item.nonfinite = True
            failed.append(item)
    return failed


def score_prompt(item: ScheduledSeq, rows) -> list[TokenLogprobs]:
    """Prompt logprobs from a prefill chunk's logit rows [num_new_tokens, V]: the row at position p
    scores prompt token p + 1, for the positions not scored yet."""
    seq = item.seq
    start = seq.num_computed_tokens
    first, end = len(seq.prompt_logprobs), min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
    targets = seq.token_ids[first + 1 : end + 1]
    return token_logprobs(rows[first - start : end - start], targets, [seq.params.prompt_logprobs] * len(targets))

