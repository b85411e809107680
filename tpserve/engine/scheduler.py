"""Iteration-level continuous batching. Plain Python, no torch.

Each `schedule()` call builds one step under a token budget: running sequences first (decodes and
unfinished prefill chunks, in admission order), then waiting sequences in arrival order (a long
prompt is chunked rather than skipped, so it cannot starve behind short ones). When blocks run
out, the most recently admitted running sequence is preempted by recompute: its blocks are freed
and it returns to the head of the waiting queue, keeping the tokens it generated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tpserve.config import ConfigError
from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sequence import Sequence, SeqStatus


class RequestRejected(ValueError):
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


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes
    num_lookahead: int = 0  # extra slots reserved for speculative proposals

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence's known tokens."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def check_feasible(self, seq: Sequence, num_lookahead: int = 0) -> None:
        total = seq.max_total_tokens
        if total > self.config.max_model_len:
            raise RequestRejected(
                f"prompt length {seq.num_prompt_tokens} + max_tokens {seq.params.max_tokens} = {total} "
                f"exceeds the max model length {self.config.max_model_len}"
            )
        bm = self.block_manager
        needed = bm.blocks_needed(total + num_lookahead)
        if needed > bm.num_blocks:
            raise RequestRejected(
                f"prompt length {seq.num_prompt_tokens} + max_tokens {seq.params.max_tokens} needs "
                f"{needed} KV blocks of {bm.block_size} tokens, but the cache has {bm.num_blocks} "
                f"({bm.num_blocks * bm.block_size} tokens)"
            )

    def add(self, seq: Sequence) -> None:
        self.check_feasible(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
            decoding = seq.num_computed_tokens + num_new == seq.num_tokens and seq.num_output_tokens > 0
            lookahead = lookahead_of(seq) if decoding else 0
            while not bm.ensure_slots(seq, seq.num_computed_tokens + num_new + lookahead):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new, lookahead))
                budget -= num_new + lookahead  # proposals are verified in the same forward
                i += 1
                continue
            break
        # New admissions only when nothing was preempted this step: blocks are scarce.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not bm.admit(seq, budget):
                break
            self.waiting.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
