"""Errors a user can cause, each with a message that names the bad value and the limit.

`ConfigError` is a bad flag, config.json or checkpoint: the process refuses to start. A
`RequestError` fails one request and nothing else; its `kind` says which protocol status each
front end answers with (tpserve.v1 and OIP v2 map it to gRPC status codes, HTTP to a status).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid."""


class RequestError(Exception):
    """One request cannot be served; `kind` is protocol-neutral."""

    kind = "internal"


class InvalidRequest(RequestError, ValueError):
    """A bad field: empty prompt, out-of-range sampling value, too long for the model or the cache."""

    kind = "invalid_argument"


class Overloaded(RequestError):
    """The server cannot take the request now: the waiting queue is full (reason "queue_full"), or
    admission control predicts it would miss the TTFT SLO ("slo_ttft"). `retry_after_s` is when
    trying again may succeed."""

    kind = "resource_exhausted"

    def __init__(self, message: str, retry_after_s: int = 1, reason: str = "queue_full") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class Unavailable(RequestError):
    """The server is loading, draining, or its process group has failed."""

    kind = "unavailable"


class ComputeError(RequestError):
    """The model's computation for this one request went wrong (its logits turned NaN or
    infinite); the request fails alone and the server goes on."""

    kind = "internal"


class NotFound(RequestError):
    """The request names a model (or request id) the server does not have."""

    kind = "not_found"


class Unsupported(RequestError):
    """The served model cannot do what was asked (e.g. tokenise without a tokenizer)."""

    kind = "failed_precondition"
