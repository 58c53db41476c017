"""The error tree. Every failure that crosses a service boundary is one of these.

    CorralError                      code, retryable, status (the HTTP status the gateway maps it to)
    ├── BadRequest                   400  the request itself is wrong; never retried
    │   ├── InvalidModelName         400  "invalid model name"
    │   └── BadEnvelope              400  a work message whose headers cannot be a request
    ├── ModelNotFound                404  "model 'x' not found"
    ├── NoCapacity                   503  nothing could start it before its deadline ("server busy")
    ├── AgentUnavailable             502  the agent died or went silent; retryable before the first byte
    │   └── ServiceStopping          502  the service copy serving it stops; sent again, another copy
    │                                     takes it (``Corral-Stopping: 1`` beside the code)
    ├── BackendError                 502  the agent could not reach its Ollama; retryable
    ├── Cancelled                    499  the client went away
    ├── ReplyOverflow                503  the reply came faster than it could be passed on, past the
    │                                     gateway's bound on what one request may hold unread
    └── InternalError                500

Errors travel between services in the ``Corral-Error`` / ``Corral-Error-Code`` headers; only the
gateway turns them into HTTP statuses and Ollama's ``{"error": "..."}`` (or `/v1`'s error object).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from corral.protocol import headers as H

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class CorralError(Exception):
    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CorralError):
    code = "bad_request"
    status = 400


class InvalidModelName(BadRequest):
    code = "invalid_model_name"

    def __init__(self, name: str) -> None:
        super().__init__("invalid model name")
        self.name = name


class BadEnvelope(BadRequest):
    """A work message whose headers cannot be a request (`corral.protocol.envelope`); it travels as
    ``bad_request``."""


class Forbidden(CorralError):
    """The caller's API key may not do this (``CORRAL_AUTH=keys``)."""

    code = "forbidden"
    status = 403


class ModelNotFound(CorralError):
    """``vendor``: the model is there, but not on an agent of the vendor the request insists on."""

    code = "model_not_found"
    status = 404
    vendor: str | None = None  # also for one rebuilt from its code (`from_code`)

    def __init__(self, message: str, *, vendor: str | None = None) -> None:
        super().__init__(message)
        self.vendor = vendor


class NoCapacity(CorralError):
    code = "no_capacity"
    status = 503

    def __init__(self, message: str = BUSY_MESSAGE) -> None:
        super().__init__(message)


class AgentUnavailable(CorralError):
    code = "agent_unavailable"
    status = 502
    retryable = True


class ServiceStopping(AgentUnavailable):
    """The service copy serving the request is stopping (a registry on SIGTERM), having left its
    queue group first: the same request sent again reaches another copy, if one runs. It travels as
    ``agent_unavailable`` plus ``Corral-Stopping: 1`` (`end_error`), which a sender that does not
    know it reads as the plain retryable error."""


class BackendError(CorralError):
    code = "backend_error"
    status = 502
    retryable = True


class Cancelled(CorralError):
    code = "cancelled"
    status = 499


class ReplyOverflow(CorralError):
    """Raised by the gateway's transport (``CORRAL_REPLY_BUFFER_BYTES``); its client is still there."""

    code = "reply_overflow"
    status = 503


class InternalError(CorralError):
    code = "internal"
    status = 500


def _tree(cls: type[CorralError]) -> list[type[CorralError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


_BY_CODE: dict[str, type[CorralError]] = {}
for _cls in _tree(CorralError)[1:]:
    _BY_CODE.setdefault(_cls.code, _cls)  # a code shared with a subclass rebuilds as the base


def from_code(code: str, message: str) -> CorralError:
    """Rebuild an error received in headers; unknown codes become `InternalError`."""
    cls = _BY_CODE.get(code, InternalError)
    err = CorralError.__new__(cls)
    CorralError.__init__(err, message)
    if isinstance(err, InvalidModelName):
        err.name = ""
    return err


def end_error(headers: Mapping[str, str]) -> CorralError:
    """The error an ``end`` message carries (`corral.protocol.headers`)."""
    err = from_code(headers.get(H.ERROR_CODE, "internal"), headers.get(H.ERROR, "request failed"))
    if headers.get(H.STOPPING) == "1" and isinstance(err, AgentUnavailable):
        return ServiceStopping(err.message)
    return err


def not_found_message(endpoint: str, raw_model: str, display: str, vendor: str | None = None) -> str:
    """Ollama words its 404 differently per endpoint
    (https://github.com/ollama/ollama/blob/main/docs/api.md); with ``vendor`` (a request that
    insists on one), it says that no agent of that vendor has the model."""
    where = f" on any {vendor} agent" if vendor else ""
    if endpoint in ("/api/embed", "/api/embeddings", "/v1/embeddings"):
        return f'model "{raw_model}" not found{where}, try pulling it first'
    if endpoint in ("/api/show", "/api/push"):  # these name the model as parsed: `nope:latest`
        return f"model '{display}' not found{where}"
    return f"model '{raw_model}' not found{where}"
