"""The stall watchdog: a rank that stops making progress ends the whole group, fast.

A hang is worse than a crash: a crashed rank breaks its peers' sockets and the group fails at once,
but a stopped one (SIGSTOP, a deadlocked collective, a wedged driver) leaves every other rank
waiting inside a collective until the process-group timeout, minutes later, while health checks
still pass. So every rank runs a `Watchdog` thread that watches one bounded activity:

- rank 0 bounds each engine step and each idle heartbeat (both wait on every rank) by
  `StepBound`: `--step-timeout` when given, else an adaptive bound from the step times it has
  measured, never over `MAX_STEP_TIMEOUT_S`;
- a worker bounds the wait from one control message to the next (`worker_bound_s`): that wait can
  span the rest of one step and the start of the next up to its broadcast (draft proposals
  included), so two of rank 0's ceilings and a margin; rank 0 heartbeats while idle.

On expiry the rank SIGKILLs its peers on the same host (a stopped process ignores everything else,
and the launcher would wait its own grace period before doing the same), then the owner's
`on_stall` runs (rank 0 fails every open request and turns health NOT_SERVING), and the rank
exits with `STALL_EXIT_CODE`, so torchrun, Slurm or Kubernetes sees a failed group and restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

STALL_EXIT_CODE = 3
MAX_STEP_TIMEOUT_S = 12.0  # the adaptive bound's ceiling (a stopped rank 0: 2 x 12 + 4 = 28 s)
MIN_STEP_TIMEOUT_S = 10.0  # its floor: GC pauses, a first-time Triton compile of a new shape
STEP_TIMEOUT_FACTOR = 20.0  # times the longest step so far
WARMUP_STEPS = 16  # steps measured before the bound adapts (the ceiling holds until then)
WORKER_MARGIN_S = 4.0  # a worker's bound past two of rank 0's: the heartbeat interval and the trips


def worker_bound_s(ceiling_s: float) -> float:
    """How long a worker may go without a message from rank 0."""
    return 2 * ceiling_s + WORKER_MARGIN_S


class StepBound:
    """How long one step may take: fixed (`--step-timeout S`), or adaptive: the ceiling until
    WARMUP_STEPS steps are measured, then STEP_TIMEOUT_FACTOR times the longest step so far (a
    full-budget prefill long ago still counts), clamped to [MIN_STEP_TIMEOUT_S, MAX_STEP_TIMEOUT_S]."""

    def __init__(self, fixed_s: float | None = None) -> None:
        if fixed_s is not None and not fixed_s > 0:
            raise ValueError(f"--step-timeout must be > 0 seconds, got {fixed_s}")
        self.fixed_s = fixed_s
        self._longest = 0.0
        self._num_observed = 0

    def observe(self, seconds: float) -> None:
        self._longest = max(self._longest, seconds)
        self._num_observed += 1

    @property
    def ceiling_s(self) -> float:
        """The longest the bound can ever be (what a worker adds its margin to)."""
        return self.fixed_s if self.fixed_s is not None else MAX_STEP_TIMEOUT_S

    def seconds(self) -> float:
        if self.fixed_s is not None:
            return self.fixed_s
        if self._num_observed < WARMUP_STEPS:
            return MAX_STEP_TIMEOUT_S
        return min(MAX_STEP_TIMEOUT_S, max(MIN_STEP_TIMEOUT_S, STEP_TIMEOUT_FACTOR * self._longest))


class Watchdog:
    """A daemon thread that ends the process when a watched activity outlives its bound.

    `begin(what)` / `end()` bracket a bounded activity (rank 0: a step); `touch(what)` restarts
    the clock of an activity that is always on (a worker: waiting for the next message). `bound()`
    is read when the clock starts, so an adaptive bound applies from the next activity on."""

    def __init__(self, name: str, bound, on_stall=None, peer_pids: tuple[int, ...] = (),
                 poll_s: float = 0.1, exit=os._exit) -> None:
        self.name = name
        self.bound = bound  # () -> seconds
        self.on_stall = on_stall  # (message) -> None, run on the watchdog thread before exiting
        self.peer_pids = tuple(pid for pid in peer_pids if pid != os.getpid())
        self.poll_s = poll_s
        self._exit = exit
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._started = 0.0
        self._what = ""
        self._stop = threading.Event()
        self.fired: str | None = None
        self._thread = threading.Thread(target=self._watch, name=f"watchdog-{name}", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def begin(self, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._started, self._what, self._deadline = now, what, now + self.bound()

    touch = begin

    def end(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                deadline, started, what = self._deadline, self._started, self._what
            if deadline is None or time.monotonic() < deadline:
                continue
            self.fired = (f"{self.name}: {what} made no progress for {time.monotonic() - started:.1f} s "
                          f"(bound {deadline - started:.1f} s; --step-timeout); a rank of the group is stalled")
            logger.error("stall watchdog: %s; ending the group", self.fired)
            kill_peers(self.peer_pids)
            try:
                if self.on_stall is not None:
                    self.on_stall(self.fired)
            except Exception:
                logger.exception("stall watchdog: on_stall failed")
            finally:
                logging.shutdown()
                self._exit(STALL_EXIT_CODE)
            return


def kill_peers(pids) -> None:
    """SIGKILL the group's other processes on this host (a stopped one yields to nothing else)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
