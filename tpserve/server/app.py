"""The front end: one thread with one asyncio event loop that hosts every listener (the gRPC
server today; an HTTP server beside it on the same loop). Listeners share the serving core and
follow the server's phase."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Protocol

from tpserve.server.state import ServerState

logger = logging.getLogger(__name__)


class Listener(Protocol):
    async def start(self) -> int:
        """Bind and serve; returns the bound port."""

    async def set_phase(self, phase: str) -> None:
        """Reflect the server's phase (health and readiness)."""

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; give open calls up to grace_s."""


class FrontEnd:
    """Owns the front-end thread. All methods are safe to call from the main thread."""

    def __init__(self, state: ServerState, listeners: list[Listener]) -> None:
        self.state = state
        self.listeners = list(listeners)
        self.loop = asyncio.new_event_loop()
        self.ports: list[int] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="frontend", daemon=True)

    def start(self) -> list[int]:
        """Start every listener (readiness NOT_SERVING until `set_phase(SERVING)`); returns their ports."""
        self._thread.start()
        self.ports = [self._call(listener.start()) for listener in self.listeners]
        return self.ports

    def set_phase(self, phase: str, timeout: float = 30.0) -> None:
        self.state.phase = phase
        for listener in self.listeners:
            self._call(listener.set_phase(phase), timeout)
        logger.info("server phase: %s", phase)

    def stop(self, grace_s: float) -> None:
        async def stop_all() -> None:
            await asyncio.gather(*(listener.stop(grace_s) for listener in self.listeners))

        self._call(stop_all(), timeout=grace_s + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
