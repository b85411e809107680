"""The engine loop on rank 0, and the thread-safe door the gRPC front end talks to it through.

The loop runs in the main thread (so SIGTERM handlers work) and owns the LLMEngine. The front end,
in its own thread with its own event loop, validates and builds sequences itself (pure functions)
and hands them over through a command queue; outputs come back through a per-request asyncio
queue filled with `call_soon_threadsafe`. Neither side ever waits on the other's work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from tpserve.engine.engine import LLMEngine
from tpserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class ServerBusy(Exception):
    """The waiting queue is full (RESOURCE_EXHAUSTED)."""


class ServerUnavailable(Exception):
    """Draining, or the group has failed (UNAVAILABLE)."""


@dataclass
class Failure:
    """Delivered to every open request when the group fails."""

    message: str


class RequestHandle:
    """One request's output channel into the front end's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_queued_requests: int = 1024, heartbeat_s: float = 2.0) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.heartbeat_s = heartbeat_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._num_pending_adds = 0
        self._drain_deadline: float | None = None
        self.failed: str | None = None
        self.num_finished = 0
        self.stats = engine.stats()

    # --- front-end side (any thread) ----------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(self, seq: Sequence, handle: RequestHandle) -> None:
        with self._lock:
            if self.failed is not None:
                raise ServerUnavailable(f"the server's process group has failed: {self.failed}")
            if self.draining:
                raise ServerUnavailable("the server is draining and accepts no new requests")
            queued = self._num_pending_adds + self.stats["num_waiting"]
            if queued >= self.max_queued_requests:
                raise ServerBusy(
                    f"{queued} requests are waiting, the limit is --max-queued-requests={self.max_queued_requests}"
                )
            if seq.request_id in self._handles:
                raise ValueError(f"request id {seq.request_id!r} is already in use")
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
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if self.draining and (not self._handles or time.monotonic() >= self._drain_deadline):
                    self._abort_all()
                    self._deliver(self.engine.step())
                    self.engine.shutdown()
                    logger.info("drained; shutting down")
                    return 0
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                self.stats = self.engine.stats()
        except Exception as e:  # the group is unusable now: tell everyone, let the launcher exit
            logger.exception("engine loop failed")
            self._fail(f"{type(e).__name__}: {e}")
            return 1

    def _apply_commands(self, block: bool) -> None:
        timeout = self.heartbeat_s if block else None
        try:
            cmd = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            if block:
                self.engine.driver.heartbeat()
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
            with self._lock:
                self._num_pending_adds -= 1
            try:
                self.engine.add_sequence(arg)
            except ValueError as e:
                handle = self._handles.pop(arg.request_id, None)
                if handle is not None:
                    handle.put(e)
        elif kind == "abort":
            self.engine.abort_request(arg)

    def _deliver(self, outputs) -> None:
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            handle.put(out)
            if out.finished:
                with self._lock:
                    del self._handles[out.request_id]
                self.num_finished += 1

    def _abort_all(self) -> None:
        for request_id in self.engine.request_ids:
            self.engine.abort_request(request_id)

    def _fail(self, message: str) -> None:
        with self._lock:
            self.failed = message
            handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.put(Failure(message))
