"""An LLMEngine on a fake model, for tests of rank 0's middle without weights or a process group.

`FakeDriver` behaves like a rank that keeps its inputs in a paged cache: it applies each plan's
block-table diffs to its own mirror (ModelRunner's code), writes each step's tokens into per-block
slots, and returns one-hot logits for the token `next_token(context)` at every position asked for,
reading the context back through the block table. A wrong table, a stale slot or a bad rollback
therefore changes the output, as it would with a real model.
"""

from __future__ import annotations

import threading
import time

import torch

from tpserve.engine.engine import LLMEngine
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.scheduler import SchedulerConfig
from tpserve.engine.step import StepPlan

VOCAB = 64


def next_token(context: list[int]) -> int:
    """A deterministic 'model' that often repeats stretches of its context (so n-gram lookup is
    sometimes right) and drifts with the position."""
    n = len(context)
    if n > 6 and n % 11 < 6:
        return context[n - 6]
    return (context[-1] * 5 + context[-2 if n > 1 else -1] + n // 7) % (VOCAB - 3) + 3


class WorkerTables:
    """The block tables a worker rank holds (ModelRunner's code on a plain object)."""

    def __init__(self) -> None:
        self.block_tables: dict[int, list[int]] = {}
        self.rows = None  # no contiguous K/V rows on a fake rank

    apply_block_diffs = ModelRunner.apply_block_diffs


class FakeDriver:
    def __init__(self, num_blocks: int, block_size: int, fail_at_step: int | None = None,
                 step_seconds: float = 0.0) -> None:
        self.runner = WorkerTables()
        self.block_size = block_size
        self.slots = [[None] * block_size for _ in range(num_blocks)]
        self.num_steps = 0
        self.fail_at_step = fail_at_step
        self.step_seconds = step_seconds  # how long a step takes (lets a test see requests wait)
        self.num_heartbeats = 0
        self.shut_down = False
        self.last_contact = time.monotonic()
        self.stall = threading.Event()  # set: the next step blocks until it is cleared (a stalled rank)

    def step(self, plan: StepPlan):
        self.num_steps += 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError("a rank failed")
        while self.stall.is_set():
            time.sleep(0.01)
        self.last_contact = time.monotonic()
        self.runner.apply_block_diffs(plan)
        time.sleep(self.step_seconds)
        bs = self.block_size
        rows = []
        for work in plan.seqs:
            table = self.runner.block_tables[work.seq_id]
            for i, token in enumerate(work.token_ids):
                pos = work.num_computed_tokens + i
                self.slots[table[pos // bs]][pos % bs] = token
            if not work.sample:
                continue
            end = work.num_computed_tokens + len(work.token_ids)
            for last in range(end - work.num_logits, end):
                context = [self.slots[table[p // bs]][p % bs] for p in range(last + 1)]
                assert None not in context, f"sequence {work.seq_id} reads a slot nothing wrote"
                rows.append(next_token(context))
        logits = torch.full((len(rows), VOCAB), -10.0)
        logits[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 10.0
        return logits

    def heartbeat(self) -> None:
        self.num_heartbeats += 1
        self.last_contact = time.monotonic()

    def shutdown(self) -> None:
        self.shut_down = True


def fake_engine(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 16, budget: int = 64,
                max_model_len: int = 256, eos_token_ids=(), spec=None, fail_at_step=None,
                step_seconds: float = 0.0) -> LLMEngine:
    engine = LLMEngine(FakeDriver(num_blocks, block_size, fail_at_step, step_seconds), VOCAB, num_blocks, block_size,
                       SchedulerConfig(max_num_seqs, budget, max_model_len), eos_token_ids=eos_token_ids)
    engine.spec = spec
    return engine


def greedy_reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]
