"""The gRPC listener: one grpc.aio server with tpserve.v1.Generation, the KServe Open Inference
Protocol, grpc.health.v1 (service "" is liveness, tpserve.v1.Generation readiness) and reflection."""

from __future__ import annotations

import inspect
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tpserve.server.core import ServingCore
from tpserve.server.security import OPEN_GRPC_METHODS, UNAUTHENTICATED_MESSAGE, Security
from tpserve.server.kserve import KServeServicer, add_kserve_to_server, kserve_service_name
from tpserve.server.servicer import GenerationServicer
from tpserve.server.state import FAILED, SERVING
from tpserve.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class _Undecodable:
    """What a request that is not a valid protobuf message deserialises to (see DecodeGuard)."""

    def __init__(self, message: str) -> None:
        self.message = message


class DecodeGuard(grpc.aio.ServerInterceptor):
    """A request whose bytes do not parse as the method's message fails with INVALID_ARGUMENT,
    naming the method and the parse error (grpc itself answers UNKNOWN, as for a server bug)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method, deserialize = handler_call_details.method, handler.request_deserializer

        def guarded_deserialize(data: bytes):
            try:
                return deserialize(data)
            except Exception as e:  # protobuf's DecodeError, and anything else a parser raises
                return _Undecodable(f"the request to {method} is not a valid protobuf message: "
                                    f"{type(e).__name__}: {e}")

        if handler.response_streaming:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                async def unary_stream(request, context):
                    if isinstance(request, _Undecodable):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                    async for response in behavior(request, context):
                        yield response
            else:  # a coroutine that writes its responses (health's Watch)
                async def unary_stream(request, context):
                    if isinstance(request, _Undecodable):
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                    return await behavior(request, context)

            return handler._replace(request_deserializer=guarded_deserialize, unary_stream=unary_stream)
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)

        return handler._replace(request_deserializer=guarded_deserialize, unary_unary=unary_unary)


class AuthGuard(grpc.aio.ServerInterceptor):
    """With API keys, a call to anything but health bears `authorization: Bearer KEY` or ends with
    UNAUTHENTICATED before its request is even read."""

    def __init__(self, security: Security) -> None:
        self.security = security

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_GRPC_METHODS:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.security.authorized(metadata.get("authorization")):
            return handler
        self.security.refused("grpc")

        async def refuse(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

        ignore = {"request_deserializer": lambda data: None}  # a refused request is not parsed
        if handler.response_streaming:
            async def streaming(request, context):
                await refuse(context)
                yield  # (an async generator, as the handler's kind requires)

            kind = "stream_stream" if handler.request_streaming else "unary_stream"
            return handler._replace(**{kind: streaming}, **ignore)

        async def unary(request, context):
            await refuse(context)

        kind = "stream_unary" if handler.request_streaming else "unary_unary"
        return handler._replace(**{kind: unary}, **ignore)


class GrpcListener:
    def __init__(self, core: ServingCore, host: str, port: int, max_message_bytes: int,
                 security: Security | None = None, health_port: int = 0) -> None:
        self.core = core
        self.host = host
        self.address = f"{host}:{port}"
        self.max_message_bytes = max_message_bytes
        self.security = security or Security()
        self.health_port = health_port
        self.server = None
        self.health_server = None  # plaintext, health only (--health-port)
        self.health = None

    async def start(self) -> int:
        """Bind and start serving, readiness NOT_SERVING until the phase turns serving. Returns the
        bound port."""
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options, interceptors=[AuthGuard(self.security), DecodeGuard()])
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.core), self.server)
        add_kserve_to_server(KServeServicer(self.core), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", _SERVING)
        await self.health.set(GENERATION_SERVICE, _NOT_SERVING)
        names = (GENERATION_SERVICE, kserve_service_name(), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        if self.security.tls:
            port = self.server.add_secure_port(self.address, self.security.grpc_credentials())
        else:
            port = self.server.add_insecure_port(self.address)
        if port == 0:
            raise OSError(f"could not bind the gRPC server to {self.address}")
        await self.server.start()
        logger.info("gRPC server listening on %s (%s%s; readiness NOT_SERVING while loading)", self.address,
                    "mutual TLS" if self.security.tls_client_ca else "TLS" if self.security.tls else "plaintext",
                    ", API keys required" if self.security.api_keys else "")
        if self.health_port:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            address = f"{self.host}:{self.health_port}"
            if self.health_server.add_insecure_port(address) == 0:
                raise OSError(f"could not bind the gRPC health server to {address}")
            await self.health_server.start()
            logger.info("gRPC health (only) on %s, plaintext", address)
        return port

    async def set_phase(self, phase: str) -> None:
        await self.health.set(GENERATION_SERVICE, _SERVING if phase == SERVING else _NOT_SERVING)
        if phase == FAILED:
            await self.health.set("", _NOT_SERVING)

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
