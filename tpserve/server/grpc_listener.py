"""The gRPC listener: one grpc.aio server with tpserve.v1.Generation, the KServe Open Inference
Protocol, grpc.health.v1 (service "" is liveness, tpserve.v1.Generation readiness) and reflection."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tpserve.server.core import ServingCore
from tpserve.server.kserve import KServeServicer, add_kserve_to_server, kserve_service_name
from tpserve.server.servicer import GenerationServicer
from tpserve.server.state import FAILED, SERVING
from tpserve.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcListener:
    def __init__(self, core: ServingCore, host: str, port: int, max_message_bytes: int) -> None:
        self.core = core
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.server = None
        self.health = None

    async def start(self) -> int:
        """Bind and start serving, readiness NOT_SERVING until the phase turns serving. Returns the
        bound port."""
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.core), self.server)
        add_kserve_to_server(KServeServicer(self.core), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", _SERVING)
        await self.health.set(GENERATION_SERVICE, _NOT_SERVING)
        names = (GENERATION_SERVICE, kserve_service_name(), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        port = self.server.add_insecure_port(self.address)
        if port == 0:
            raise OSError(f"could not bind the gRPC server to {self.address}")
        await self.server.start()
        logger.info("gRPC server listening on %s (readiness NOT_SERVING while loading)", self.address)
        return port

    async def set_phase(self, phase: str) -> None:
        await self.health.set(GENERATION_SERVICE, _SERVING if phase == SERVING else _NOT_SERVING)
        if phase == FAILED:
            await self.health.set("", _NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
