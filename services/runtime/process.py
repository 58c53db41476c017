"""Process plumbing for entry points: the event loop, signals, an embedded uvicorn, common flags."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import uvicorn
from corral.runtime.fleet import IdInUse
from corral.runtime.logs import setup_logging
from corral.runtime.metricsserver import MetricsPortError
from corral.runtime.nats import NatsRefused
from corral.runtime.natsauth import CredentialsError
from corral.runtime.settings import CommonSettings, SettingsError, settings_from_args
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


S = TypeVar("S", bound=CommonSettings)


def parse_settings(
    parser: argparse.ArgumentParser, cls: type[S], argv: list[str] | None
) -> tuple[argparse.Namespace, S] | None:
    """A command line and the settings it gives (flags > ``CORRAL_*`` > defaults); None, after the
    message on stderr, when a setting is invalid (the command then exits 2)."""
    args = parser.parse_args(argv)
    try:
        return args, settings_from_args(cls, args)
    except SettingsError as e:
        sys.stderr.write(f"{parser.prog}: {e}\n")
        return None


# what stops a service before it is up, for a reason a restart cannot cure: said in one line, exit 1
CONFIGURATION_ERRORS = (NatsRefused, MetricsPortError, CredentialsError, IdInUse)


def service_main(
    parser: argparse.ArgumentParser,
    cls: type[S],
    argv: list[str] | None,
    service: str,
    serve: Callable[[S], Coroutine[Any, Any, int]],
) -> int:
    """A service's ``main``: its settings (a bad one: exit code 2), logging, then ``serve``."""
    parsed = parse_settings(parser, cls, argv)
    if parsed is None:
        return 2
    settings = parsed[1]
    setup_logging(settings.log_level, service=service)
    try:
        rc = run(serve(settings))
    except CONFIGURATION_ERRORS as e:  # said in one line
        log.error("%s", e)
        return 1
    log.info("stopped (exit status %d)", rc)  # its log's last line, as the operator reads it
    return rc


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a main coroutine on uvloop where available.

    SIGINT or SIGTERM before the coroutine waits for signals itself (`wait_for_signal`; a service
    still waiting for NATS, say) cancels it, so the ``finally`` blocks of what it was doing run, and
    the process exits 0 with one line, as a service stopped once up does, not with a traceback. A
    cancellation no signal asked for is a bug, and is raised as one."""
    try:
        import uvloop

        loop_run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    except ImportError:
        loop_run = asyncio.run
    stopped: list[signal.Signals] = []
    try:
        return int(loop_run(_stoppable(coro, stopped)))
    except KeyboardInterrupt:  # asyncio's runner: SIGINT cancelled the coroutine, which has ended
        stopped.append(signal.SIGINT)
    except asyncio.CancelledError:
        if not stopped:
            raise
    log.warning("stopped by %s before it was up", stopped[0].name)
    return 0


async def _stoppable(coro: Coroutine[Any, Any, int], stopped: list[signal.Signals]) -> int:
    """``coro``, cancelled by SIGTERM (noted in ``stopped``) until `wait_for_signal` takes the
    signal over; asyncio's runner does the same for SIGINT."""
    task = asyncio.current_task()
    assert task is not None

    def stop() -> None:
        stopped.append(signal.SIGTERM)
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
    return await coro


async def wait_for_signal() -> signal.Signals:
    """Wait for SIGINT or SIGTERM (an event, not a sleep loop); returns the signal.

    Later ones, while the process drains, are said and otherwise ignored: a second Ctrl-C would
    else raise KeyboardInterrupt in the middle of the drain, cut it short and print a traceback.
    The drain is bounded by its grace periods; SIGKILL ends the process at once."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()

    def deliver(sig: signal.Signals) -> None:
        if not got.done():
            log.info("%s: stopping", sig.name)
            got.set_result(sig)

    def again(sig: signal.Signals) -> None:
        log.warning("%s: already stopping; running work finishes within its grace period", sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, deliver, sig)
    try:
        return await got
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, again, sig)


async def wait_for_stop(lost: asyncio.Event) -> bool:
    """Wait for SIGINT or SIGTERM, or for ``lost`` (the NATS connection closed for good); True when
    the connection was lost, and the service should exit non-zero so that its supervisor restarts it."""
    signalled = asyncio.create_task(wait_for_signal(), name="signals")
    closed = asyncio.create_task(lost.wait(), name="connection-lost")
    try:
        await asyncio.wait((signalled, closed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (signalled, closed):
            t.cancel()
        await asyncio.wait((signalled, closed))
    if lost.is_set():
        log.error("the NATS connection is closed for good: exiting so that a supervisor restarts us")
        return True
    return False


# Go's net/http (http.DefaultMaxHeaderBytes, which Ollama's server keeps): a request head larger
# than this is answered 431 and its connection closed
MAX_HEADER_BYTES = 1 << 20
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n431 Request Header Fields Too Large"
)


LINGER_S = 0.5  # Go's closeWriteAndWait


class _HeaderTimeout(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with bounds on the request head: a connection must deliver a
    request's whole header block within ``header_timeout_s`` of opening (or of the request's first
    byte on a kept-alive connection), else it is closed; and in at most `MAX_HEADER_BYTES` (give or
    take the read in which the request begins, at most 256 KiB), else it is answered 431 and closed. uvicorn itself waits
    forever for headers and keeps however many bytes of them come, so one client trickling them a
    byte at a time would hold a socket for good, and one sending an endless header the memory."""

    header_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _in_head = True  # between a request's first byte (or the connection's) and its headers' end
    _head_bytes = 0
    _refused = False  # answered 431: the connection closes after `LINGER_S`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends after the 431: read and dropped
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse_head()
                return
        super().data_received(data)

    def _refuse_head(self) -> None:
        """Answer 431 and close, as Go does: the write side first, then, after a moment in which
        what the client still sends is read and dropped, the socket. Closed at once, a socket with
        unread bytes is reset, and the client might never read the answer."""
        self._refused = True
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head while the last response still goes out: no answer can be put in
            # the middle of it, so the connection just closes, as for a head that never ends
            log.info("%s: pipelined request headers over %d bytes; closing", self.client, MAX_HEADER_BYTES)
            self.transport.close()
            return
        log.info("%s: request headers over %d bytes; answering 431", self.client, MAX_HEADER_BYTES)
        self.transport.write(_TOO_LARGE)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes = True, 0
        self._arm_head_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            _close_delimited(self.cycle)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info(
                "%s: request headers not received within %gs; closing", self.client, self.header_timeout_s
            )
            self.transport.close()


def _close_delimited(cycle: Any) -> None:
    """An HTTP/1.0 request's response without a length ends where its connection does, as Go's
    net/http (Ollama's server) sends it: uvicorn would chunk it, which HTTP/1.0 does not know
    (RFC 9112, 6.1: a server must not send Transfer-Encoding to it), so its client would read the
    chunk sizes as part of the body. ``cycle``'s ``send`` (uvicorn's request-response cycle, before
    its application starts) is wrapped: such a response is written as it comes, its connection
    closed after it (uvicorn closes an HTTP/1.0 connection after each response)."""
    send = cycle.send
    raw = False

    async def close_delimited(message: dict[str, Any]) -> None:
        nonlocal raw
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", ())}
            raw = (
                b"content-length" not in names
                and b"transfer-encoding" not in names
                and cycle.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
                and message["status"] >= 200
            )
            if raw:  # uvicorn's bookkeeping of a body of known length, the length ours to keep
                cycle.chunked_encoding = False
                cycle.expected_content_length = sys.maxsize
        elif raw and message["type"] == "http.response.body" and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # this is the end
        await send(message)

    cycle.send = close_delimited


def _protocol(header_timeout_s: float) -> type[_HeaderTimeout]:
    return type("HeaderTimeoutProtocol", (_HeaderTimeout,), {"header_timeout_s": header_timeout_s})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals belong to the process's own main, not to one server inside it


class AsgiServer:
    """uvicorn inside our own event loop: ``await start()`` returns once it listens. With
    ``tls_cert`` and ``tls_key`` (PEM files) it serves HTTPS."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        *,
        log_level: str = "warning",
        graceful_s: int = 30,
        header_timeout_s: float = 10.0,
        tls_cert: str = "",
        tls_key: str = "",
    ) -> None:
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="on",
            log_level=log_level.lower(),
            access_log=False,
            http=_protocol(header_timeout_s),
            ws="none",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=graceful_s,
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
        )
        self._server = _Server(self.config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.config.loaded:
            self.config.load()
        self._server.lifespan = self.config.lifespan_class(self.config)
        await self._server.startup()
        if self._server.should_exit or not self._server.started:
            raise RuntimeError(f"could not start the HTTP server on {self.config.host}:{self.config.port}")
        self._task = asyncio.create_task(self._server.main_loop(), name="uvicorn")

    @property
    def port(self) -> int:
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def grace_s(self) -> float:
        """How long `stop` lets open requests finish before it cuts them."""
        grace = self.config.timeout_graceful_shutdown
        return float("inf") if grace is None else float(grace)  # None: uvicorn waits for ever

    @property
    def url(self) -> str:
        scheme = "https" if self.config.ssl_certfile else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (graceful timeout), run the lifespan shutdown."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        await self._server.shutdown()
