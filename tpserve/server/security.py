"""Who may talk to the server: TLS (and mutual TLS) on the gRPC and HTTP ports, and API keys.

Keys come from `--api-key` (repeatable), the `TPSERVE_API_KEY` environment variable and
`--api-key-file` (one key per line, `#` comments); with none, every route is open. With keys, every
inference route of every protocol needs `Authorization: Bearer KEY` (gRPC metadata
`authorization`), compared in constant time against every key; health stays open (probes), and so
do metrics unless `--protect-metrics`. A refusal is UNAUTHENTICATED / 401 and is counted
(`tpserve:request_unauthenticated_total{protocol}`).

`--health-port` serves grpc.health.v1 alone, in plaintext, for kubelet probes that cannot speak
TLS or send keys.
"""

from __future__ import annotations

import hmac
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from tpserve.config import ConfigError

# gRPC methods anyone may call: health and the OIP v2 liveness / readiness probes.
OPEN_GRPC_METHODS = frozenset({
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})
# HTTP paths anyone may call (metrics too unless --protect-metrics).
OPEN_HTTP_PATHS = frozenset({"/health", "/version"})
METRICS_PATH = "/metrics"
UNAUTHENTICATED_MESSAGE = "a valid API key is required: send the header 'authorization: Bearer <key>'"


def add_security_args(p) -> None:
    p.add_argument("--tls-cert", default=None, help="PEM certificate (chain): serve gRPC and HTTPS over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: mutual TLS, clients must present a certificate it signed")
    p.add_argument("--api-key", action="append", default=[],
                   help="an API key every inference request must bear (repeatable; also TPSERVE_API_KEY)")
    p.add_argument("--api-key-file", default=None, help="a file of API keys, one per line (# comments)")
    p.add_argument("--protect-metrics", action="store_true", help="metrics need an API key too")
    p.add_argument("--health-port", type=int, default=0,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes; 0: none)")


@dataclass
class Security:
    api_keys: tuple[bytes, ...] = ()
    protect_metrics: bool = False
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None
    tls_paths: dict = field(default_factory=dict)  # the files, for uvicorn
    on_refused: object = None  # (protocol) -> None: counts a refusal

    @classmethod
    def from_args(cls, args, environ=None) -> "Security":
        env = os.environ if environ is None else environ
        keys = [k for k in args.api_key if k]
        if env.get("TPSERVE_API_KEY"):
            keys.append(env["TPSERVE_API_KEY"])
        if args.api_key_file:
            path = Path(args.api_key_file)
            if not path.is_file():
                raise ConfigError(f"--api-key-file {args.api_key_file!r} is not a file")
            keys += [line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.strip().startswith("#")]
        for key in keys:
            if len(key) < 16 or any(c.isspace() for c in key):
                raise ConfigError(f"an API key of {len(key)} characters is refused: keys need at least 16 characters "
                                  "and no spaces")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together (got only "
                              f"{'--tls-cert' if args.tls_cert else '--tls-key'})")
        if args.tls_client_ca and not args.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        files = {name: getattr(args, name) for name in ("tls_cert", "tls_key", "tls_client_ca") if getattr(args, name)}
        data = {}
        for name, value in files.items():
            try:
                data[name] = Path(value).read_bytes()
            except OSError as e:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: {e.strerror}") from None
        if args.tls_cert:  # a bad pair fails here, at start-up, with the file names
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.tls_cert, args.tls_key)
            except (ssl.SSLError, ValueError) as e:
                raise ConfigError(f"--tls-cert {args.tls_cert!r} / --tls-key {args.tls_key!r}: {e}") from None
        return cls(tuple(k.encode() for k in dict.fromkeys(keys)), args.protect_metrics, data.get("tls_cert"),
                   data.get("tls_key"), data.get("tls_client_ca"), files)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def authorized(self, authorization: str | None) -> bool:
        """Whether an `authorization` value bears a valid key; every key is compared (in constant
        time) whatever the outcome, so timing does not tell how much of a key matched, or which."""
        if not self.api_keys:
            return True
        scheme, _, presented = (authorization or "").partition(" ")
        candidate = presented.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(candidate, key)
        return ok

    def refused(self, protocol: str) -> None:
        if self.on_refused is not None:
            self.on_refused(protocol)

    def http_needs_key(self, path: str) -> bool:
        if not self.api_keys or path in OPEN_HTTP_PATHS:
            return False
        return path != METRICS_PATH or self.protect_metrics

    def grpc_credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.tls_client_ca,
                                           require_client_auth=self.tls_client_ca is not None)

    def uvicorn_options(self) -> dict:
        if not self.tls:
            return {}
        options = {"ssl_certfile": self.tls_paths["tls_cert"], "ssl_keyfile": self.tls_paths["tls_key"]}
        if self.tls_client_ca is not None:
            options.update(ssl_ca_certs=self.tls_paths["tls_client_ca"], ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options
