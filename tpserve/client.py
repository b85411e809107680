"""Python client and command line for a tpserve server.

    python -m tpserve.client "def fib(n):" --stream --max-tokens 64 [--address localhost:50051]

    from tpserve.client import Client
    with Client("localhost:50051") as c:
        for piece in c.generate_stream("def fib(n):", max_tokens=32, temperature=0):
            print(piece.text, end="")
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tpserve.v1 import generation_pb2 as pb
from tpserve.v1 import generation_pb2_grpc as pb_grpc

FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclass
class Completion:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token_s: float = 0.0
    logprobs: list = field(default_factory=list)
    model: str = ""  # the model that served it
    route: pb.RouteInfo | None = None  # an `auto` request's routing


def build_request(prompt: str | list[int], stream: bool, request_id: str | None = None, model: str = "",
                  **sampling) -> pb.GenerateRequest:
    """model: a served model's name, "auto", or empty for the target."""
    req = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, stream=stream, model=model,
                             sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call (the server's --api-key)."""

    def __init__(self, key: str) -> None:
        self.metadata = ("authorization", f"Bearer {key}")

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def open_channel(address: str, tls_ca: str | None = None, api_key: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None) -> grpc.Channel:
    """A channel to a tpserve server: plaintext, or TLS trusting `tls_ca` (PEM; None with
    client_cert: the system roots), presenting client_cert / client_key for mutual TLS; every call
    bears `api_key` when given."""
    if tls_ca or client_cert:
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(read(tls_ca), read(client_key), read(client_cert))
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _Bearer(api_key)) if api_key else channel


class Client:
    def __init__(self, address: str = "localhost:50051", timeout: float | None = None, tls_ca: str | None = None,
                 api_key: str | None = None, client_cert: str | None = None, client_key: str | None = None) -> None:
        self.channel = open_channel(address, tls_ca, api_key, client_cert, client_key)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(self, prompt, request_id: str | None = None, model: str = "", **sampling):
        """Yields GenerateResponse messages: chunks, then one complete."""
        yield from self.stub.Generate(build_request(prompt, True, request_id, model, **sampling), timeout=self.timeout)

    def generate(self, prompt, request_id: str | None = None, model: str = "", **sampling) -> Completion:
        """Non-streaming: one final message with the whole output."""
        (resp,) = list(self.stub.Generate(build_request(prompt, False, request_id, model, **sampling),
                                          timeout=self.timeout))
        c = resp.complete
        return Completion(resp.request_id, list(c.token_ids), c.text, FINISH_NAMES.get(c.finish_reason),
                          c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens,
                          c.time_to_first_token_s, list(c.logprobs), c.model,
                          c.route if c.HasField("route") else None)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id)).aborted

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)).token_ids)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest())

    def server_info(self) -> pb.GetServerInfoResponse:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpserve.client", description="Generate from a tpserve server.")
    p.add_argument("prompt")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--model", default="", help="a served model's name, or auto (default: the target)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--tls-ca", default=None, help="PEM CA to trust: connect over TLS")
    p.add_argument("--tls-client-cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-client-key", default=None)
    p.add_argument("--api-key", default=os.environ.get("TPSERVE_API_KEY"), help="default: $TPSERVE_API_KEY")
    args = p.parse_args(argv)
    sampling = {"max_tokens": args.max_tokens, "stop": args.stop, "model": args.model}
    for key in ("temperature", "top_k", "top_p", "seed"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    try:
        with Client(args.address, args.timeout, args.tls_ca, args.api_key, args.tls_client_cert,
                    args.tls_client_key) as client:
            if args.stream:
                for resp in client.generate_stream(args.prompt, **sampling):
                    if resp.HasField("chunk"):
                        print(resp.chunk.text, end="", flush=True)
                    else:
                        c = resp.complete
                        print(f"\n[{c.model}; {FINISH_NAMES.get(c.finish_reason)}; {c.usage.completion_tokens} tokens; "
                              f"TTFT {c.time_to_first_token_s * 1000:.0f} ms]", file=sys.stderr)
            else:
                done = client.generate(args.prompt, **sampling)
                print(done.text)
                print(f"[{done.model}; {done.finish_reason}; {done.completion_tokens} tokens]", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
