"""The loop every rank other than 0 runs: receive a plan, compute it, repeat."""

from __future__ import annotations

from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.step import Heartbeat, Shutdown, StepPlan


def run_worker(runner: ModelRunner) -> None:
    """Blocks until rank 0 sends `Shutdown`. Any exception propagates so the launcher tears the
    whole group down instead of leaving rank 0 waiting on a collective."""
    tp = runner.tp
    while True:
        msg = tp.broadcast_object(None)
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, Heartbeat):
            continue
        if not isinstance(msg, StepPlan):
            raise TypeError(f"worker rank {tp.tp_rank} got an unknown control message {type(msg).__name__}")
        runner.execute(msg)


class Driver:
    """Rank 0's side of the step protocol: every plan goes to all ranks, then rank 0 computes its
    own share and receives the logits."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def step(self, plan: StepPlan):
        self.runner.tp.broadcast_object(plan)
        return self.runner.execute(plan)

    def heartbeat(self) -> None:
        self.runner.tp.broadcast_object(Heartbeat())

    def shutdown(self, reason: str = "shutdown") -> None:
        self.runner.tp.broadcast_object(Shutdown(reason))
