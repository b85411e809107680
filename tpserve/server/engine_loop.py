"""The engine loop on rank 0, and the thread-safe door the front end talks to it through.

The loop runs in the main thread (so SIGTERM handlers work) and owns the LLMEngine. The front end,
in its own thread with its own event loop, builds sequences itself (tpserve.server.requests) and
hands them over through a command queue; outputs come back through a per-request asyncio queue
filled with `call_soon_threadsafe`, and so do errors (a RequestError: a request refused when the
engine added it, or Unavailable for every open request when the group fails). Neither side ever
waits on the other's work, and the front end reads the engine's statistics only as the snapshot
the loop publishes after each step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from tpserve.engine.engine import LLMEngine
from tpserve.engine.sequence import Sequence
from tpserve.errors import ComputeError, InvalidRequest, Overloaded, Unavailable
from tpserve.server.admission import AdmissionController

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # rank 0 heartbeats the workers after this long without a step


class RequestHandle:
    """One request's output channel into the front end's event loop. `on_finished(output)`, if
    given, runs on that loop for the request's last output, whether or not anyone still reads the
    queue (a caller that went away still had a request that finished, by abort)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_finished=None) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.on_finished = on_finished

    def _arrive(self, item) -> None:
        self.queue.put_nowait(item)
        if self.on_finished is not None and getattr(item, "finished", False):
            self.on_finished(item)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self._arrive, item)
        except RuntimeError:
            if not self.loop.is_closed():
                raise
            # The caller went away with its event loop (its abort is on the way): nobody listens.


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_queued_requests: int = 1024, heartbeat_s: float = HEARTBEAT_S,
                 on_step=None, admission: AdmissionController | None = None, watchdog=None,
                 step_bound=None) -> None:
        """on_step(num_tokens), if given, runs on the engine thread after each forward step;
        `admission`, if given, refuses a request whose predicted time to first token misses the SLO
        and learns the step cost from every step. `watchdog` (tpserve.distributed.watchdog), if
        given, bounds every step and heartbeat; `step_bound` (a StepBound) learns each step's time."""
        self.engine = engine
        self.watchdog = watchdog
        self.step_bound = step_bound
        self.on_step = on_step
        self.admission = admission
        self.max_queued_requests = max_queued_requests
        self.heartbeat_s = heartbeat_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        # Submitted requests the published stats do not count yet (the queue limit adds both).
        self._num_pending_adds = 0
        self._num_applied_adds = 0  # of those, added to the engine since the last publish
        self._drain_deadline: float | None = None
        self.failed: str | None = None
        self.num_finished = 0
        self.stats = engine.stats()

    # --- front-end side (any thread) ----------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(self, seq: Sequence, handle: RequestHandle, admitted: bool = False) -> None:
        """Queue a sequence; Overloaded when the waiting queue is full or admission control refuses
        it, unless `admitted` (part of a request that passed those checks already)."""
        if seq.request_id in self._handles:  # (checked again under the lock) before admission counts it
            raise InvalidRequest(f"request id {seq.request_id!r} is already in use")
        if self.admission is not None:  # its own lock: the engine thread's per-step publish never waits on it
            self.admission.admit(seq.request_id, seq.num_prompt_tokens, seq.params.max_tokens, check=not admitted)
        try:
            self._queue(seq, handle, admitted)
        except Exception:
            if self.admission is not None:
                self.admission.forget(seq.request_id)
            raise

    def _queue(self, seq: Sequence, handle: RequestHandle, admitted: bool) -> None:
        with self._lock:
            if self.failed is not None:
                raise Unavailable(f"the server's process group has failed: {self.failed}")
            if self.draining:
                raise Unavailable("the server is draining and accepts no new requests")
            queued = self._num_pending_adds + self.stats.num_waiting
            if queued >= self.max_queued_requests and not admitted:
                raise Overloaded(
                    f"{queued} requests are waiting, the limit is --max-queued-requests={self.max_queued_requests}"
                )
            if seq.request_id in self._handles:
                raise InvalidRequest(f"request id {seq.request_id!r} is already in use")
            self._handles[seq.request_id] = handle
            self._num_pending_adds += 1
        self._commands.put(("add", seq))

    def abort(self, request_id: str) -> bool:
        """Abort a running request; False when the id is unknown or already finished."""
        if request_id not in self._handles:
            return False
        self._commands.put(("abort", request_id))
        return True

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests; let in-flight ones finish for up to `timeout_s`, then abort them."""
        with self._lock:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + timeout_s
                logger.info("draining: %d requests in flight, up to %.1f s", len(self._handles), timeout_s)
        self._commands.put(("wake", None))

    # --- engine side (main thread) ------------------------------------------------------------
    def run(self) -> int:
        """Serve until drained (returns 0) or until the group fails (returns 1)."""
        try:
            while True:
                self._apply_commands(block=not self.engine.has_work())
                if self.draining and (not self._handles or time.monotonic() >= self._drain_deadline):
                    self._abort_all()
                    self._deliver(self._watched_step())
                    # A request submitted just before the drain began may still be in the queue.
                    self._end_open_requests(Unavailable("the server drained and shut down before this request ran"))
                    self.engine.shutdown()
                    logger.info("drained; shutting down")
                    return 0
                stepped, started = False, time.perf_counter()
                if self.engine.has_work():
                    steps = self.engine.num_steps
                    self._deliver(self._watched_step())
                    stepped = self.engine.num_steps > steps
                if time.monotonic() - self.engine.last_contact >= self.heartbeat_s:
                    self._heartbeat()  # idle, or a step that sent the workers nothing
                self._publish_stats()
                if stepped:  # the whole iteration: the step, delivering its outputs, publishing
                    self._observe_step(time.perf_counter() - started)
        except Exception as e:  # the group is unusable now: tell everyone, let the launcher exit
            logger.exception("engine loop failed")
            self._fail(f"{type(e).__name__}: {e}")
            return 1

    def _watched_step(self):
        """engine.step() under the stall watchdog; its time teaches the adaptive step bound."""
        if self.watchdog is not None:
            self.watchdog.begin(f"engine step {self.engine.num_steps + 1}")
        started = time.monotonic()
        try:
            return self.engine.step()
        finally:
            if self.watchdog is not None:
                self.watchdog.end()
            if self.step_bound is not None:
                self.step_bound.observe(time.monotonic() - started)

    def _heartbeat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.begin("the idle heartbeat")
        try:
            self.engine.heartbeat()
        finally:
            if self.watchdog is not None:
                self.watchdog.end()

    def _observe_step(self, seconds: float) -> None:
        if self.admission is not None:
            self.admission.observe_step(self.engine.last_step_num_tokens, self.engine.last_step_num_seqs, seconds)
        if self.on_step is not None:
            self.on_step(self.engine.last_step_num_tokens)

    def calibrate(self, make_sequence, num_steps: int = 16) -> None:
        """Before serving: run warm-up requests through the engine so that admission control has
        measured prefills of three sizes up to the token budget and decode steps of every batch
        size up to 8 (the requests finish one by one). make_sequence(request_id, prompt_token_ids,
        max_tokens) builds a Sequence (the request factory); the outputs go nowhere."""
        if self.admission is None:
            return
        budget = self.engine.scheduler.config.max_num_batched_tokens
        max_len = self.engine.scheduler.config.max_model_len
        batch = max(1, min(self.engine.scheduler.config.max_num_seqs, 8))
        vocab = self.engine.vocab_size
        bm = self.engine.block_manager
        longest = min(budget, max_len - 2, (bm.num_blocks - 1) * bm.block_size)  # must fit the KV cache too
        prompt = [3 + (i * 7919) % (vocab - 3) for i in range(max(1, longest))]
        for size in (len(prompt), len(prompt) // 4, len(prompt) // 16):  # each its own prefill step
            if size > 16:
                self.engine.add_sequence(make_sequence(f"calibrate-long-{size}", prompt[-size:], 1))
                while self.engine.has_work():
                    self._calibration_step()
        for i in range(batch):
            self.engine.add_sequence(make_sequence(f"calibrate-{i}", prompt[i * 8 : i * 8 + 8] or [3],
                                                   num_steps - i))
        while self.engine.has_work():
            self._calibration_step()
        self._publish_stats()

    def _calibration_step(self) -> None:
        steps, started = self.engine.num_steps, time.perf_counter()
        self._watched_step()
        if self.engine.num_steps > steps:
            self._observe_step(time.perf_counter() - started)

    def _apply_commands(self, block: bool) -> None:
        """Apply every queued command; with `block`, first wait for one until the next heartbeat
        is due (the caller sends it)."""
        timeout = max(0.0, self.heartbeat_s - (time.monotonic() - self.engine.last_contact))
        try:
            cmd = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd) -> None:
        kind, arg = cmd
        if kind == "add":
            self._num_applied_adds += 1
            try:
                self.engine.add_sequence(arg)
            except InvalidRequest as e:
                if self.admission is not None:
                    self.admission.forget(arg.request_id)
                handle = self._handles.pop(arg.request_id, None)
                if handle is not None:
                    handle.put(e)
        elif kind == "abort":
            self.engine.abort_request(arg)

    def _publish_stats(self) -> None:
        """The front end's snapshot; requests added since the last one leave the pending count
        only now that the snapshot counts them (as waiting, or running if already admitted)."""
        stats = self.engine.stats()
        with self._lock:
            self.stats = stats
            self._num_pending_adds -= self._num_applied_adds
        self._num_applied_adds = 0

    def _deliver(self, outputs) -> None:
        for out in outputs:
            if self.admission is not None:
                self.admission.on_output(out.request_id, out.num_output_tokens, out.finished, out.finish_reason)
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            handle.put(out if out.error is None else ComputeError(out.error))
            if out.finished:
                with self._lock:
                    del self._handles[out.request_id]
                self.num_finished += 1

    def _abort_all(self) -> None:
        for request_id in self.engine.request_ids:
            self.engine.abort_request(request_id)

    def stalled(self, message: str) -> None:
        """The watchdog's word (on its own thread, while this loop is stuck in a step): fail every
        open request and refuse new ones, as when the group fails."""
        self._fail(f"stall: {message}")

    def _fail(self, message: str) -> None:
        with self._lock:
            self.failed = message
        self._end_open_requests(Unavailable(f"the server failed: {message}"))

    def _end_open_requests(self, error: Unavailable) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
        for request_id, handle in handles.items():
            if self.admission is not None:
                self.admission.forget(request_id)
            handle.put(error)
