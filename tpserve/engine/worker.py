"""The loop every rank other than 0 runs: receive a plan, compute it, repeat."""

from __future__ import annotations

import time

from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.step import Heartbeat, Shutdown, StepPlan, decode, encode


def run_worker(runner: ModelRunner, watchdog=None) -> None:
    """Blocks until rank 0 sends `Shutdown`. Any exception propagates so the launcher tears the
    whole group down instead of leaving rank 0 waiting on a collective. `watchdog`, if given (a
    tpserve.distributed.watchdog.Watchdog), is started by the first message and touched by every
    one after it: silence from rank 0 past its bound ends the group."""
    tp = runner.tp
    while True:
        msg = decode(tp.broadcast_bytes(None))  # ControlMessageError if malformed: the group ends
        if watchdog is not None:
            watchdog.touch("waiting for rank 0's next control message")
        if isinstance(msg, Shutdown):
            if watchdog is not None:
                watchdog.stop()  # what follows (teardown) is not a stall
            return
        if isinstance(msg, Heartbeat):
            tp.barrier()  # a round trip: rank 0's heartbeat waits for every rank
            continue
        if not isinstance(msg, StepPlan):
            raise TypeError(f"worker rank {tp.tp_rank} got an unknown control message {type(msg).__name__}")
        runner.execute(msg)


class Driver:
    """Rank 0's side of the step protocol: every plan goes to all ranks, then rank 0 computes its
    own share and receives the logits."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.last_contact = time.monotonic()  # when every rank last heard from rank 0

    def step(self, plan: StepPlan):
        if self.runner.tp.tp_size > 1:  # alone, there is no one to tell
            self.runner.tp.broadcast_bytes(encode(plan))
        out = self.runner.execute(plan)
        self.last_contact = time.monotonic()
        return out

    def heartbeat(self) -> None:
        """Every rank answers (a barrier), so a stalled one stalls the heartbeat and rank 0's
        watchdog sees it even while no request runs."""
        self.runner.tp.broadcast_bytes(encode(Heartbeat()))
        self.runner.tp.barrier()
        self.last_contact = time.monotonic()

    def shutdown(self, reason: str = "shutdown") -> None:
        self.runner.tp.broadcast_bytes(encode(Shutdown(reason)))
