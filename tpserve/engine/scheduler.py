"""Iteration-level continuous batching, and what happens to a request after each forward. Plain
Python, no torch.

Each `schedule()` call builds one step under a token budget: running sequences first (decodes and
unfinished prefill chunks, in admission order), then waiting sequences in arrival order (a long
prompt is chunked rather than skipped, so it cannot starve behind short ones). When blocks run
out, the most recently admitted running sequence is preempted by recompute: its blocks are freed
and it returns to the head of the waiting queue, keeping the tokens it generated.

`plan()` turns the step into the message every rank receives (block tables as diffs), and
`update()` applies the forward's result: computed tokens, prefix-cache commits, the sampled
tokens with their stop checks, finishing, and the release of lookahead blocks that rejected
proposals left unused. `finish()` is the one way a request ends (stop, length or abort).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sequence import TARGET, Sequence, SeqStatus
from tpserve.engine.step import SeqWork, StepPlan
from tpserve.errors import ConfigError, InvalidRequest


class RequestRejected(InvalidRequest):
    """The request can never be scheduled; the message names the value and the limit."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")


def check_feasible(seq: Sequence, max_model_len: int, num_blocks: int, block_size: int) -> None:
    """Raise RequestRejected when `seq` could never run: longer than the model allows, or more
    KV blocks than the whole cache has."""
    total = seq.max_total_tokens
    if total > max_model_len:
        raise RequestRejected(
            f"prompt length {seq.num_prompt_tokens} + max_tokens {seq.params.max_tokens} = {total} "
            f"exceeds the max model length {max_model_len}"
        )
    needed = -(-total // block_size)
    if needed > num_blocks:
        raise RequestRejected(
            f"prompt length {seq.num_prompt_tokens} + max_tokens {seq.params.max_tokens} needs "
            f"{needed} KV blocks of {block_size} tokens, but the cache has {num_blocks} "
            f"({num_blocks * block_size} tokens)"
        )


@dataclass(eq=False, slots=True)
class ScheduledSeq:
    """One sequence's share of a step: what was scheduled (fixed when scheduled), the proposal
    speculation adds before the forward, and the tokens sampled after it."""

    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes
    num_lookahead: int = 0  # extra slots reserved for speculative proposals
    samples: bool = field(init=False)  # the step reaches the end of the sequence's known tokens
    decoding: bool = field(init=False)  # ... and samples a decoding sequence's next token
    scores_prompt: bool = field(init=False)  # logits at every position of this prompt chunk
    num_tail_rows: int = field(init=False)  # leading logit rows that score the prompt's last tokens (router)
    proposal: Any = None  # spec_decode.Proposal, set before the forward
    tokens: list[int] | tuple = ()  # accepted proposals + one sampled token (a list once sampled)
    logprobs: list | tuple = ()
    prompt_logprobs: list | tuple = ()  # the prompt tokens this chunk scored
    nonfinite: bool = False  # its logit rows hold a NaN or an infinity: nothing is sampled, it fails

    def __post_init__(self) -> None:
        seq = self.seq
        end = seq.num_computed_tokens + self.num_new_tokens
        self.samples = end == seq.num_tokens
        self.decoding = self.samples and seq.is_decoding
        self.scores_prompt = (seq.prompt_logprobs is not None
                              and len(seq.prompt_logprobs) < min(end, seq.num_prompt_tokens - 1))
        self.num_tail_rows = 0
        route = seq.route
        if route is not None and not self.scores_prompt and not seq.is_decoding:
            first = route.tail_start(seq.model, seq.num_prompt_tokens)
            if first is not None:  # the chunk's positions in [first, prompt - 1), always its last ones
                self.num_tail_rows = max(0, min(end, seq.num_prompt_tokens - 1) - max(first, seq.num_computed_tokens))

    @property
    def num_logit_rows(self) -> int:
        """Logit rows the forward returns for this sequence: every chunk position when scoring
        the prompt, else 1 + k (k proposals) when it samples."""
        if self.scores_prompt:
            return self.num_new_tokens
        if not self.samples:
            return self.num_tail_rows
        return 1 + self.num_tail_rows + (len(self.proposal.tokens) if self.proposal is not None else 0)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: tuple[int, ...] = (),
                 on_finish: Callable[[Sequence], None] | None = None) -> None:
        """on_finish(seq) runs whenever a request ends (after its blocks are freed)."""
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = tuple(eos_token_ids)
        self.on_finish = on_finish
        self.waiting: deque[Sequence] = deque()
        self.background: deque[Sequence] = deque()  # admitted only when nothing waits
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_handovers = 0  # sequences moved from one model to the other (tpserve.route)
        self.num_prompt_tokens = 0  # running totals: prompts computed, tokens generated
        self.num_generation_tokens = 0
        self._tables_to_drop: list[int] = []  # seq ids whose worker tables the next plan drops

    def check_feasible(self, seq: Sequence) -> None:
        bm = self.block_manager
        check_feasible(seq, self.config.max_model_len, bm.num_blocks, bm.block_size)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; a background one (`seq.background`) is admitted only while no other
        sequence waits."""
        self.check_feasible(seq)
        seq.status = SeqStatus.WAITING
        (self.background if seq.background else self.waiting).append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.background)

    # --- planning a step ----------------------------------------------------------------------
    def schedule(self, num_lookahead: int | Callable[[Sequence], int] = 0) -> SchedulerOutput:
        """Plan one step. `num_lookahead` slots (a count, or a count per sequence) are reserved
        after each decoding sequence for speculative proposals."""
        lookahead_of = num_lookahead if callable(num_lookahead) else (lambda seq: num_lookahead)
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            item = ScheduledSeq(seq, num_new)
            item.num_lookahead = lookahead_of(seq) if item.decoding else 0
            while not bm.ensure_slots(seq, seq.num_computed_tokens + num_new + item.num_lookahead):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(item)
                budget -= num_new + item.num_lookahead  # proposals are verified in the same forward
                i += 1
                continue
            break
        # New admissions only when nothing was preempted this step: blocks are scarce. Background
        # work (the router's quality audits) only when no request waits.
        for queue in (self.waiting, self.background):
            if queue is self.background and self.waiting:
                break
            while queue and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
                seq = queue[0]
                if not bm.admit(seq, budget):
                    break
                queue.popleft()
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                seq.status = SeqStatus.RUNNING
                if seq.times.first_scheduled is None:
                    seq.times.first_scheduled = time.monotonic()
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        return out

    def continue_on(self, seq: Sequence, model: str) -> None:
        """Switch a running sequence to the other model without recomputing: its blocks already hold
        that model's K/V (the gap policy computed the prompt with both). The workers drop its
        table if the small model takes over."""
        if seq.num_sent_blocks is not None and model != TARGET:
            self._tables_to_drop.append(seq.seq_id)
            seq.num_sent_blocks = None
        seq.model = model
        self.num_handovers += 1

    def plan(self, batch: SchedulerOutput) -> StepPlan:
        """The step as every rank receives it: a sequence's whole block table the first time the
        workers see it (or after a preemption), afterwards only appended block ids and the length
        to truncate to after a rollback; and the tables to drop."""
        works = []
        for item in batch.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            tokens = seq.token_ids[start : start + item.num_new_tokens]
            work = SeqWork(seq.seq_id, tokens, start, sample=item.num_logit_rows > 0, num_logits=item.num_logit_rows)
            if item.proposal is not None:
                work.token_ids = tokens + item.proposal.tokens
            if seq.num_sent_blocks is None:
                work.block_table = list(seq.block_table)
            else:
                work.num_blocks_kept = seq.num_sent_blocks
                work.new_blocks = seq.block_table[seq.num_sent_blocks :]
            seq.num_sent_blocks = len(seq.block_table)
            works.append(work)
        return StepPlan(works, self.take_tables_to_drop())

    def take_tables_to_drop(self) -> list[int]:
        dropped, self._tables_to_drop = self._tables_to_drop, []
        return dropped

    @property
    def num_tables_to_drop(self) -> int:
        return len(self._tables_to_drop)

    # --- after the forward --------------------------------------------------------------------
    def update(self, batch: SchedulerOutput, now: float) -> list[Sequence]:
        """Apply a forward's result (each item's `tokens`, sampled or verified) at time `now`:
        the K/V of the step's tokens and of the accepted proposals are now computed, full blocks
        among them enter the prefix cache, the tokens are appended until one finishes the
        request, and the lookahead blocks a verified proposal did not fill are released. Returns the
        sequences that got output, in step order (finished ones included)."""
        updated = []
        for item in batch.scheduled:
            seq = item.seq
            if item.nonfinite:  # the engine fails it next; its K/V must not enter the prefix cache
                continue
            num_accepted = len(item.tokens) - 1 if item.tokens else 0
            seq.num_computed_tokens += item.num_new_tokens + num_accepted
            self.block_manager.commit(seq, seq.num_computed_tokens)
            if item.prompt_logprobs:
                seq.prompt_logprobs.extend(item.prompt_logprobs)
            if item.samples and seq.params.max_tokens == 0:  # the prompt is scored: done
                self.num_prompt_tokens += seq.num_prompt_tokens
                self.finish(seq, "length")
                updated.append(seq)
                continue
            if not item.tokens:
                continue
            if not self._append(seq, item.tokens, item.logprobs, now) and item.proposal is not None:
                self._release_lookahead(seq)
            updated.append(seq)
        return updated

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list, now: float) -> bool:
        """Append tokens one at a time until one finishes the request (later ones are dropped).
        Returns whether it finished."""
        p = seq.params
        detok = seq.detokenizer
        times = seq.times
        if times.first_token is None:
            times.first_token = now
            self.num_prompt_tokens += seq.num_prompt_tokens
        for token, lp in zip(tokens, logprobs):
            self.num_generation_tokens += 1
            seq.token_ids.append(token)
            times.token_times.append(now)
            if lp is not None:
                seq.unsent_logprobs.append(lp)
            num_output = seq.num_output_tokens
            may_stop = num_output >= p.min_tokens
            if detok is not None:
                detok.add([token], check_stop=may_stop)
            if may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
                reason = "stop"
            elif detok is not None and detok.stopped_by is not None:
                reason = "stop"
            elif num_output >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
                reason = "length"
            else:
                continue
            self.finish(seq, reason)
            return True
        return False

    def _release_lookahead(self, seq: Sequence) -> None:
        """Free the blocks reserved for proposals past the sequence's tokens; the workers keep
        only the valid prefix of its table."""
        self.block_manager.truncate(seq, seq.num_tokens)
        if seq.num_sent_blocks is not None:
            seq.num_sent_blocks = min(seq.num_sent_blocks, len(seq.block_table))

    # --- leaving the running set --------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request (stop, length or abort): out of the queues, its blocks freed, its worker
        table dropped with the next plan."""
        if seq.is_finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.background:
            self.background.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.times.finished = time.monotonic()
        if self.on_finish is not None:
            self.on_finish(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)
        seq.num_preemptions += 1
        seq.times.preemptions.append(time.monotonic())
        self.num_preemptions += 1

    def hand_over(self, seq: Sequence, model: str) -> None:
        """Move a running sequence to the other model: the K/V it holds belongs to the model that
        computed it, so its blocks go (into that model's prefix cache) and the new model computes
        the whole context, prefix-cache hits of its own first, from the head of the queue. Its
        tokens are kept."""
        assert seq.status is SeqStatus.RUNNING, f"sequence {seq.seq_id} is not running"
        self.running.remove(seq)
        self._requeue(seq)
        seq.model = model
        self.num_handovers += 1

    def _requeue(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SeqStatus.WAITING
        (self.background if seq.background else self.waiting).appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.num_sent_blocks is not None:
            self._tables_to_drop.append(seq.seq_id)
            seq.num_sent_blocks = None
