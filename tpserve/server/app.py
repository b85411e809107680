"""The gRPC front end: one grpc.aio server, on its own thread and event loop, serving
tpserve.v1.Generation, the KServe Open Inference Protocol, grpc.health.v1 and reflection."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tpserve.server.kserve import KServeServicer, add_kserve_to_server, kserve_service_name
from tpserve.server.servicer import GenerationServicer
from tpserve.server.state import DRAINING, FAILED, SERVING, ServerState
from tpserve.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class FrontEnd:
    """Owns the server thread. All methods are safe to call from the main thread."""

    def __init__(self, state: ServerState, host: str, port: int, max_message_bytes: int) -> None:
        self.state = state
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.loop = asyncio.new_event_loop()
        self.health = None
        self.server = None
        self.port = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-frontend", daemon=True)

    def start(self) -> int:
        """Bind and start serving (readiness NOT_SERVING until `set_serving`). Returns the port."""
        self._thread.start()
        return self._call(self._start())

    async def _start(self) -> int:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.state), self.server)
        add_kserve_to_server(KServeServicer(self.state), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(GENERATION_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        names = (GENERATION_SERVICE, kserve_service_name(), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        port = self.server.add_insecure_port(self.address)
        if port == 0:
            raise OSError(f"could not bind the gRPC server to {self.address}")
        await self.server.start()
        self.port = port
        logger.info("gRPC server listening on %s (readiness NOT_SERVING while loading)", self.address)
        return port

    def set_phase(self, phase: str) -> None:
        self.state.phase = phase
        status = health_pb2.HealthCheckResponse.SERVING if phase == SERVING else health_pb2.HealthCheckResponse.NOT_SERVING
        self._call(self.health.set(GENERATION_SERVICE, status))
        if phase == FAILED:
            self._call(self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        logger.info("server phase: %s", phase)

    def stop(self, grace_s: float) -> None:
        if self.server is not None:
            self._call(self.server.stop(grace_s), timeout=grace_s + 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


__all__ = ["FrontEnd", "DRAINING", "FAILED", "SERVING"]
