"""Rank 0's engine: requests in, per-step streamed outputs out.

Each `step()` asks the scheduler for a plan, sends it to every rank (as block-table diffs), runs
rank 0's share of the forward, samples, detokenises, checks stop conditions, and commits the
blocks whose tokens became final to the prefix cache.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.detokenizer import IncrementalDetokenizer
from tpserve.engine.sampler import Sampler, TokenLogprobs
from tpserve.engine.sampling_params import SamplingError, SamplingParams
from tpserve.engine.scheduler import RequestRejected, ScheduledSeq, Scheduler, SchedulerConfig
from tpserve.engine.sequence import Sequence
from tpserve.engine.step import SeqWork, StepPlan


@dataclass
class RequestOutput:
    """What one step produced for one request. `text` is the new text only (a delta)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    time_to_first_token: float | None = None
    speculation: dict | None = None  # per-request speculative decoding metrics, at finish


@dataclass
class CompletedRequest:
    """A whole request's result, as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[TokenLogprobs]
    time_to_first_token: float | None
    speculation: dict | None = None


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
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.sampler = Sampler(self.eos_token_ids, seed)
        self.spec = spec  # SpecDecoder or None
        self._seq_ids = itertools.count()
        self._requests: dict[str, Sequence] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._sent_blocks: dict[int, int] = {}  # seq_id -> table length the workers hold
        self._dropped: list[int] = []  # seq ids whose worker tables must be dropped next step
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self.num_steps = 0

    # --- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
    ) -> None:
        """Queue a request. Raises RequestRejected / SamplingError (naming value and limit)."""
        self.add_sequence(self.make_sequence(request_id, prompt, prompt_token_ids, params))

    def make_sequence(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
    ) -> Sequence:
        """Validate a request and build its sequence without touching engine state, so a front
        end thread can reject bad requests while the engine thread keeps stepping."""
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt, prompt_token_ids)
        params.validate(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer; this model directory has none")
        seq = Sequence(next(self._seq_ids), request_id, ids, params)
        self.scheduler.check_feasible(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Engine thread only: start scheduling a sequence made by `make_sequence`."""
        if seq.request_id in self._requests:
            raise RequestRejected(f"request id {seq.request_id!r} is already in use")
        self.scheduler.add(seq)
        self._requests[seq.request_id] = seq
        if self.tokenizer is not None:
            self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.stop)

    def _prompt_ids(self, prompt, prompt_token_ids) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise RequestRejected("give exactly one of a text prompt and prompt token ids")
        if prompt is not None:
            if not prompt:
                raise RequestRejected("prompt is empty")
            if self.tokenizer is None:
                raise RequestRejected("text prompt given but the model has no tokenizer; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
            if bad:
                raise RequestRejected(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise RequestRejected("prompt is empty")
        return ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        self._pending.append(self._finish(seq, RequestOutput(request_id)))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    # --- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs, self._pending = self._pending, []
        k, speculating = self._plan_k()
        sched = self.scheduler.schedule(num_lookahead=self._lookahead(k, speculating))
        for seq in sched.preempted:
            self._drop_worker_table(seq.seq_id)
        if not sched.scheduled:
            if self._dropped:
                self.driver.step(StepPlan(finished=self._take_dropped()))
            return outputs
        proposals = self._propose(sched.scheduled)
        plan = StepPlan([self._work(s, proposals.get(s.seq.seq_id)) for s in sched.scheduled], self._take_dropped())
        logits = self.driver.step(plan)
        self.num_steps += 1
        results = self._sample(sched.scheduled, logits, proposals)
        now = time.monotonic()
        emitted = 0
        for item in sched.scheduled:
            seq = item.seq
            tokens, lps = results.get(seq.seq_id, ([], []))
            proposal = proposals.get(seq.seq_id)
            num_accepted = len(tokens) - 1 if proposal is not None else 0
            seq.num_computed_tokens += item.num_new_tokens + num_accepted
            self.block_manager.commit(seq, seq.num_computed_tokens)
            if not tokens:
                continue
            emitted += len(tokens)
            if self.spec is not None:
                self.spec.account(seq, len(proposal.tokens) if proposal else 0, num_accepted, len(tokens))
            outputs.append(self._append_tokens(seq, tokens, lps, now))
            if self.spec is not None and not seq.is_finished:
                if proposal is not None:
                    self._roll_back(seq)
                elif item.num_new_tokens == 1:
                    self.spec.observe(seq, len(tokens))
        if self.spec is not None and all(s.num_new_tokens == 1 for s in sched.scheduled):
            # Decode-only steps measure what each k is worth on this machine, whole step included.
            self.spec.record_step(len(sched.scheduled), k, len(proposals), emitted, time.perf_counter() - started)
        return outputs

    def _plan_k(self) -> tuple[int, set[int] | None]:
        """This step's k and the ids of the decoding sequences that speculate (None: all)."""
        if self.spec is None:
            return 0, None
        decoding = [s for s in self.scheduler.running if s.num_computed_tokens == s.num_tokens - 1]
        k, count = self.spec.plan_k([s.seq_id for s in decoding])
        if count >= len(decoding):
            return k, None
        # A subset (a probe) is the sequences cheapest for the proposer to catch up on.
        return k, {s.seq_id for s in heapq.nsmallest(count, decoding, key=self.spec.proposer.pending_tokens)}

    def _lookahead(self, k: int, speculating: set[int] | None):
        """Lookahead per sequence: this step's k for the speculating sequences, except that seeded
        sampled requests always get the fixed largest k, so their random draws (and tokens) do not
        depend on load."""
        if self.spec is None:
            return 0
        max_k = self.spec.controller.max_k

        def lookahead(seq: Sequence) -> int:
            if seq.params.seed is not None and not seq.params.greedy:
                return max_k
            return k if speculating is None or seq.seq_id in speculating else 0

        return lookahead

    def _propose(self, scheduled: list[ScheduledSeq]) -> dict:
        items = [s for s in scheduled if s.num_lookahead > 0]
        if not items:
            return {}
        seqs = [s.seq for s in items]
        ks = [self.spec.cap(s.seq, s.num_lookahead) for s in items]
        return {seq.seq_id: p for seq, k, p in zip(seqs, ks, self.spec.propose(seqs, ks)) if k > 0}

    def _sample(self, scheduled: list[ScheduledSeq], logits, proposals: dict) -> dict:
        """seq_id -> (tokens to emit, their logprobs) for every sequence that samples this step."""
        plain, plain_rows, spec_rows, row = [], [], {}, 0
        for item in scheduled:
            if not item.samples:
                continue
            proposal = proposals.get(item.seq.seq_id)
            n = 1 + (len(proposal.tokens) if proposal is not None else 0)
            if proposal is not None:
                spec_rows[item.seq.seq_id] = (item.seq, logits[row : row + n])
            else:
                plain.append(item.seq)
                plain_rows.append(row)
            row += n
        results = {}
        if plain:
            tokens, lps = self.sampler.sample(logits[plain_rows], plain)
            for seq, t, lp in zip(plain, tokens, lps):
                results[seq.seq_id] = ([t], [lp])
        if spec_rows:
            batch = [(seq, rows, proposals[seq_id], self.sampler.generator_for(seq))
                     for seq_id, (seq, rows) in spec_rows.items()]
            for (seq, rows, _, _), tokens in zip(batch, self.spec.verify(batch, self.eos_token_ids)):
                lps = self.sampler.logprobs(rows[: len(tokens)], [seq] * len(tokens), tokens)
                results[seq.seq_id] = (tokens, lps)
        return results

    def _roll_back(self, seq: Sequence) -> None:
        """Release blocks reserved for rejected proposals; workers keep only the valid prefix."""
        self.block_manager.truncate(seq, seq.num_tokens)
        if seq.seq_id in self._sent_blocks:
            self._sent_blocks[seq.seq_id] = min(self._sent_blocks[seq.seq_id], len(seq.block_table))
        self.spec.proposer.on_verified(seq)

    def _work(self, item: ScheduledSeq, proposal=None) -> SeqWork:
        seq = item.seq
        start = seq.num_computed_tokens
        tokens = seq.token_ids[start : start + item.num_new_tokens]
        work = SeqWork(seq.seq_id, tokens, start, sample=item.samples)
        if proposal is not None:
            work.token_ids = tokens + proposal.tokens
            work.num_logits = 1 + len(proposal.tokens)
        sent = self._sent_blocks.get(seq.seq_id)
        if sent is None:
            work.block_table = list(seq.block_table)
        else:
            work.num_blocks_kept = sent
            work.new_blocks = seq.block_table[sent:]
        self._sent_blocks[seq.seq_id] = len(seq.block_table)
        return work

    def _drop_worker_table(self, seq_id: int) -> None:
        if self._sent_blocks.pop(seq_id, None) is not None:
            self._dropped.append(seq_id)

    def _take_dropped(self) -> list[int]:
        dropped, self._dropped = self._dropped, []
        return dropped

    def _append_tokens(self, seq: Sequence, tokens: list[int], lps: list, now: float) -> RequestOutput:
        """Append tokens one at a time until one finishes the request; later ones are dropped."""
        out = RequestOutput(seq.request_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        detok = self._detok.get(seq.seq_id)
        for token, lp in zip(tokens, lps):
            seq.token_ids.append(token)
            out.new_token_ids.append(token)
            if lp is not None:
                out.logprobs.append(lp)
            may_stop = seq.num_output_tokens >= p.min_tokens
            if detok is not None:
                detok.add([token], check_stop=may_stop)
            if may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
                seq.finish_reason = "stop"
            elif detok is not None and detok.stopped_by is not None:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.scheduler.config.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                return self._finish(seq, out)
        if detok is not None:
            out.text = detok.delta(finished=False)
        return self._fill_counts(seq, out)

    def _finish(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        self.scheduler.remove(seq)
        self._drop_worker_table(seq.seq_id)
        self.sampler.release(seq.seq_id)
        if self.spec is not None:
            out.speculation = self.spec.finish(seq)
        self._requests.pop(seq.request_id, None)
        detok = self._detok.pop(seq.seq_id, None)
        if detok is not None:
            out.text = detok.delta(finished=True)
        out.finished = True
        out.finish_reason = seq.finish_reason
        return self._fill_counts(seq, out)

    @staticmethod
    def _fill_counts(seq: Sequence, out: RequestOutput) -> RequestOutput:
        out.num_prompt_tokens = seq.num_prompt_tokens
        out.num_output_tokens = seq.num_output_tokens
        out.num_cached_tokens = seq.num_cached_tokens
        if seq.first_token_time is not None:
            out.time_to_first_token = seq.first_token_time - seq.arrival_time
        return out

    # --- conveniences -------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[CompletedRequest]:
        """Run prompts (text or token-id lists) to completion; results in input order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"gen-{next(self._seq_ids)}-{i}" for i in range(len(prompts))]
        acc = {}
        for rid, prompt, p in zip(ids, prompts, params_list):
            text = prompt if isinstance(prompt, str) else None
            self.add_request(rid, text, None if text is not None else prompt, p)
            acc[rid] = CompletedRequest(rid, list(self._requests[rid].prompt_token_ids), [], "", "", 0, [], None)
        while any(not acc[r].finish_reason for r in ids):
            for out in self.step():
                if out.request_id not in acc:
                    continue
                done = acc[out.request_id]
                done.token_ids += out.new_token_ids
                done.text += out.text
                done.logprobs += out.logprobs
                if out.finished:
                    done.finish_reason = out.finish_reason
                    done.num_cached_tokens = out.num_cached_tokens
                    done.time_to_first_token = out.time_to_first_token
                    done.speculation = out.speculation
        return [acc[r] for r in ids]

    def stats(self) -> dict:
        counts = self.block_manager.counts()
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "kv_blocks_free": counts["free"],
            "kv_blocks_cached": counts["cached"],
            "kv_blocks_in_use": counts["in_use"],
            "kv_blocks_total": counts["total"],
            "prefix_cache_hit_rate": self.block_manager.hit_rate,
            "num_steps": self.num_steps,
            "speculation": self.spec.totals.as_dict() if self.spec is not None else None,
        }

    def shutdown(self) -> None:
        self.driver.shutdown()
