"""Connect to NATS.

A connection reconnects for ever, with a capped, jittered backoff between attempts, and logs
its errors at most once per `ERROR_LOG_EVERY_S`. A connection that nats-py closes for good
(the server closed it for a protocol or authorization error) calls ``on_closed``: each service's
``serve`` waits on that beside its stop signal and exits non-zero, so its supervisor restarts it
instead of leaving a process up that answers nothing. The JetStream buckets each service opens on
that connection are `corral.runtime.buckets`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from corral.runtime.natsauth import CredentialsError
from corral.runtime.natsauth import NatsAuth as NatsAuth  # callers take it from here, beside connect
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeout

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.25  # the wait before the second attempt to reach a server that went away
RECONNECT_MAX_S = 2.0  # the backoff's cap: a restarted server is found again within this
ERROR_LOG_EVERY_S = 10.0  # the same connection error is logged at most this often
COMMAND_RECONNECTS = 2  # a command run once (the CLI) tries each server this many times more
REFUSED_CLOSE_S = 2.0  # the most a refused first connection is given to close its socket
# A link cut without a word (a cable, a host's network gone) leaves a connection that looks up:
# nothing arrives and nothing says why. The client pings the server this often and takes the
# connection for lost once this many pings went unanswered (about 9 s; nats-py's defaults, 120 s
# and 2, made it minutes, while requests waited on a connection that was gone)
PING_INTERVAL_S = 3.0
PINGS_OUTSTANDING = 2


def reconnect_delay(attempts: int, *, rng: random.Random | None = None) -> float:
    """The wait before reconnect attempt ``attempts + 1``: doubling from `RECONNECT_FIRST_S`,
    capped at `RECONNECT_MAX_S`, with jitter (a half to the whole of it) so a fleet that lost its
    server does not come back in lockstep."""
    if attempts <= 0:
        return 0.0
    full = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (attempts - 1))
    return float(full * (0.5 + 0.5 * (rng or random).random()))


def _next_server(servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
    """nats-py's reconnect hook: the least-tried server, after its backoff."""
    server = min(servers, key=lambda s: s.reconnects)
    return server, reconnect_delay(server.reconnects)


class _Client(NATS):
    """nats-py's client, closing the socket of a connection whose handshake failed. Its reconnect
    loop keeps one transport object and opens the next attempt's socket over the last one without
    closing it, so each attempt that reached something other than a NATS server (a proxy or a load
    balancer with nothing behind it, the port taken by another program) left a socket open until
    the garbage collector found it."""

    async def _process_connect_init(self) -> None:
        try:
            await super()._process_connect_init()
        except BaseException:
            if self._transport is not None:
                self._transport.close()  # type: ignore[no-untyped-call]
            raise


class _RateLimitedLog:
    """Logs an error at once, then at most one every `ERROR_LOG_EVERY_S` (saying how many were held
    back): a server that is away is one line every few seconds, not one per reconnect attempt."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last: float | None = None
        self._held = 0

    def __call__(self, e: Exception | str) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < ERROR_LOG_EVERY_S:
            self._held += 1
            return
        more = f" ({self._held} more errors since the last one logged)" if self._held else ""
        log.warning("%s: NATS error: %s%s", self.name, str(e) or type(e).__name__, more)
        self._last, self._held = now, 0


def server_urls(url: str) -> list[str]:
    """The servers of a NATS URL setting: one URL, or several comma-separated (the nodes of a
    cluster, ``nats://a:4222,nats://b:4222``); blanks around and between them are dropped. nats-py
    takes the list as its server pool and moves on to the next server when one goes away."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError("no NATS server URL given")
    return servers


class NatsRefused(ConnectionError):
    """The NATS server refused this process's first connection for a reason retrying cannot cure:
    its identity is not authorized, or the server's certificate does not verify. A service exits
    with status 1 and says so; a later refusal (an identity revoked while connected) closes the
    connection for good instead (``on_closed``)."""


class NatsUnreachable(ConnectionError):
    """No NATS server of the URL could be reached within a command's patience (`connect_command`)."""


class NoFleet(Exception):
    """No fleet lives under this root: its buckets are not there (a mistyped ``--root``, say;
    `corral.runtime.buckets.require_fleet`)."""

    def __init__(self, root: str) -> None:
        super().__init__(
            f"no fleet under root {root!r} on this NATS (its buckets are not there: a mistyped --root? "
            "`corral status` or any Corral service makes them)"
        )


def refused_for_good(e: BaseException) -> bool:
    """Whether a first-connection error is one retrying cannot cure (see `NatsRefused`)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return True
    text = str(e).lower()
    return "authorization violation" in text or "authentication" in text


async def connect(
    url: str,
    *,
    name: str,
    on_closed: Callable[[], object] | None = None,
    on_reconnected: Callable[[], object] | None = None,
    on_disconnected: Callable[[], object] | None = None,
    auth: NatsAuth | None = None,
    reconnects: int = -1,
    quiet_first: bool = False,
) -> NATS:
    """A connection that reconnects for ever (or tries each server ``reconnects`` times more, the
    first connection included, then raises nats-py's ``NoServersError``; the bound holds for later
    reconnects too unless lifted, as `connect_command` does) and reports state changes in the log;
    `NatsRefused` when the server refuses the first connection for good (see there). With
    ``quiet_first`` the first connection's errors are logged at debug level only: a command says
    in one line of its own why it could not connect.

    ``url`` is one server or a comma-separated list of them (`server_urls`); ``auth`` this process's
    identity and TLS files (`NatsAuth.of(settings)`; raises `CredentialsError` for a bad one).

    ``on_closed`` is called once the connection is closed, by us or for good by nats-py;
    ``on_disconnected`` whenever it is lost (not closed), for views to stop counting the silence
    that follows as their peers' (`corral.runtime.fleet.FleetView.connection_lost`);
    ``on_reconnected`` after every reconnect (a restarted server may have lost what lived in
    memory: the caller wakes its own loops to ensure its buckets and restart its watches — the
    callback runs inside nats-py's reconnect, so it must not wait on NATS itself)."""

    nc = _Client()
    connected = False
    error_log = _RateLimitedLog(name)

    async def on_disconnect() -> None:
        if nc.is_closed or nc.is_draining:
            log.debug("%s: NATS connection closed", name)
        else:
            log.warning("%s: disconnected from NATS", name)
            if on_disconnected is not None:
                on_disconnected()

    got_past: BaseException | None = None  # the last error a reconnect got past: no cause of a close

    async def on_reconnect() -> None:
        nonlocal got_past
        got_past = nc.last_error
        log.info("%s: reconnected to NATS", name)
        if on_reconnected is not None:
            on_reconnected()

    async def on_error(e: Exception) -> None:
        if "permissions violation" in str(e).lower():
            _last_denial[:] = [str(e), time.monotonic()]  # what a call timing out soon after says
        if connected or not quiet_first:
            error_log(e)
        else:
            log.debug("%s: NATS error: %s", name, e)
        if not connected and refused_for_good(e):
            # raised inside nats-py's first connect, which it ends: retrying cannot help
            raise NatsRefused(f"NATS at {url} refused this process: {e}") from e

    told = False

    async def on_close() -> None:
        nonlocal told
        if told:
            return
        told = True
        if connected and nc.last_error is not None and nc.last_error is not got_past:
            log.error("%s: NATS connection closed for good: %s", name, nc.last_error)
        if on_closed is not None:
            on_closed()

    options: dict[str, Any] = dict(
        name=name,
        max_reconnect_attempts=reconnects,
        reconnect_time_wait=RECONNECT_MAX_S,  # nats-py's own wait, only used while closing
        reconnect_to_server_handler=_next_server,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        closed_cb=on_close,
        drain_timeout=5,  # bounded: a stop never waits longer than this for subscriptions to drain
        ping_interval=PING_INTERVAL_S,
        max_outstanding_pings=PINGS_OUTSTANDING,
        **(auth.options() if auth is not None else {}),
    )
    try:
        await nc.connect(server_urls(url), **options)
    except NatsRefused:
        # the refused attempt's socket; a TLS one whose handshake failed can wait for ever to close
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFUSED_CLOSE_S):
                await nc.close()
        raise
    connected = True
    got_past = nc.last_error  # a server of the list that refused before another took us: no cause
    _decode_leniently(nc)  # before any subscription: any client may publish to our subjects
    _close_reliably(nc, on_close)
    return nc


def _close_reliably(nc: NATS, on_close: Callable[[], Awaitable[None]]) -> None:
    """Make sure ``on_close`` runs once ``nc`` is closed. nats-py's private ``_close`` marks the
    client closed first, then flushes what is pending to the socket and only at its end calls the
    closed callback: when the server has just reset the connection (it closed it for good, e.g. on
    an authorization violation), that flush raises ``ConnectionResetError`` and the callback never
    runs, so a service would wait on a connection that is gone. This wraps ``_close`` (nats-py 2.16
    and later) to call ``on_close`` itself when ``_close`` fails that way."""
    close = nc._close

    async def guarded(status: int, do_cbs: bool = True) -> None:
        try:
            await close(status, do_cbs)
        except OSError as e:  # the socket was reset under the final flush: closed all the same
            if not (do_cbs and nc.is_closed):
                raise
            log.debug("NATS connection closed with an error: %r", e)
            await on_close()

    nc._close = guarded  # type: ignore[method-assign]


def _decode_leniently(nc: NATS) -> None:
    """Make ``nc`` deliver a message whose subject or reply subject is not UTF-8 with the bad bytes
    replaced (U+FFFD) instead of ending its read loop. nats-py decodes both as strict UTF-8 inside
    that loop: one such message from any client would leave the connection looking open while it
    reads nothing more. Every other message is built as before, at no extra cost; the message still
    reaches its subscription (a single-shot claim sees its one delivery), and a reply subject with
    U+FFFD in it is never a usable one. This wraps nats-py's private ``_build_message``, the one
    place where the decoding happens (nats-py 2.16 and later)."""
    build = nc._build_message

    def lenient(sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        try:
            return build(sid, subject, reply, data, headers)
        except UnicodeDecodeError:
            log.warning("a message on %r has a subject or reply subject that is not UTF-8", subject[:80])
            return build(sid, _utf8(subject), _utf8(reply), data, headers)

    nc._build_message = lenient  # type: ignore[method-assign]


def _utf8(raw: bytes) -> bytes:
    return raw.decode("utf-8", "replace").encode()


async def round_trip(nc: NATS, timeout: float) -> bool:
    """A barrier: True once the server has read everything sent here before the call, and all it
    sent before that has been read here; False when that is not known within ``timeout``.

    Not `nats.aio.client.Client.flush`, which nats-py 2.16 gets wrong twice: its PING is written
    straight to the socket, ahead of commands still buffered (so it can return before the server has
    read a SUB sent just before), and it cancels its PONG's future on a timeout or when its caller is
    cancelled but leaves it queued, so the late PONG ends the read loop (``InvalidStateError``) and
    the connection reads nothing more. Here the buffer is written out first, then the PING; the
    future is only waited on, never cancelled: a late PONG completes it, a reconnect forgets it."""
    if not nc.is_connected:
        return False  # nothing is read or answered meanwhile
    written = asyncio.create_task(nc._flush_pending(force_flush=True))  # returns once written
    done, _ = await asyncio.wait([written], timeout=timeout)
    if not done:
        written.cancel()  # nats-py's flush loop stopped (the connection is down): nothing to wait for
        return False
    if not nc.is_connected:
        return False
    pong = asyncio.get_running_loop().create_future()
    await nc._send_ping(pong)
    try:
        await asyncio.wait_for(asyncio.shield(pong), timeout)  # a timeout cancels the shield only
    except TimeoutError:
        return False
    return True


async def connect_command(url: str, *, name: str, auth: NatsAuth | None = None) -> NATS:
    """`connect` for a command run once (the CLI): each server is tried `COMMAND_RECONNECTS` times
    more, then `NatsUnreachable` — a service waits for NATS to come up, a command says it is not.
    Once connected it reconnects for ever, as a service does: a pull that streams for minutes
    rides out a NATS restart (nats-py reads the bound again on every reconnect)."""
    try:
        nc = await connect(url, name=name, auth=auth, reconnects=COMMAND_RECONNECTS, quiet_first=True)
    except NoServersError as e:
        raise NatsUnreachable(f"cannot reach NATS at {url}") from e
    nc.options["max_reconnect_attempts"] = -1
    return nc


COMMAND_ERRORS = (
    NatsUnreachable,
    NatsRefused,
    NoFleet,
    CredentialsError,  # an identity or TLS file that cannot be read
    TimeoutError,
    NatsError,
)  # JetStream's are NatsErrors


# the last permissions violation this process's NATS connections were told, and when: a call the
# server denies goes unanswered, so a command's timeout within `DENIAL_S` of one is that denial
_last_denial: list[Any] = ["", 0.0]
DENIAL_S = 15.0


def denied(subject: str) -> str | None:
    """The permissions violation NATS told this process lately of a publish to ``subject`` (a
    request the server denied goes unanswered: its timeout is that denial), else None."""
    text, at = _last_denial
    if text and time.monotonic() - at < DENIAL_S and f'"{subject}"' in text:
        return str(text)
    return None


async def listened(nc: NATS, subject: str, timeout: float = 1.0) -> bool | None:
    """Whether some process subscribes to ``subject``: NATS answers "no responders" at once to a
    request nobody subscribes to (https://docs.nats.io/nats-concepts/core-nats/reqreply), while a
    subscriber that does not answer lets it time out. None when NATS denied this identity the
    request (it says nothing either way)."""
    try:
        await nc.request(subject, b"", timeout=timeout)
    except NoRespondersError:
        return False
    except NatsTimeout:
        return None if denied(subject) is not None else True
    return True


def denied_js_create() -> str | None:
    """The permissions violation NATS told this process lately of a request to create a JetStream
    stream (a KV bucket is one), else None: such a request goes unanswered, and waiting on cannot help."""
    text, at = _last_denial
    if text and time.monotonic() - at < DENIAL_S and "$JS.API.STREAM.CREATE." in str(text).upper():
        return str(text)
    return None


def command_error(url: str, e: BaseException) -> str:
    """The one line a command prints for one of `COMMAND_ERRORS` (it then exits 1): a call the
    server denied this identity goes unanswered, so a timeout after a denial names the denial."""
    if isinstance(e, (NatsUnreachable, NatsRefused, NoFleet, CredentialsError)):
        return str(e)
    if _last_denial[0] and time.monotonic() - _last_denial[1] < DENIAL_S:
        return (
            f"NATS at {url} denied this identity what the command asked ({_last_denial[0]}); "
            "commands that change the fleet need the operator's identity (--nats-creds)"
        )
    return (
        f"NATS at {url} did not answer ({e!r}); "
        "a NATS cluster without a quorum, or electing a leader, cannot answer for a while"
    )


def error_text(e: BaseException) -> str:
    """An error for a log line: nats-py's own text (a JetStream error's code and description),
    else its type's name (a bare `TimeoutError` has no text)."""
    return str(e) or type(e).__name__


STREAM_DELIVERY = "$JS.ACK."  # the reply subject of every message a JetStream consumer delivers
_DROPPED = _RateLimitedLog("a subscription of peers' messages")  # what `stream_delivery` drops


def published(cb: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """``cb`` for a core subscription that acts on what it hears (work, cancels, drain and cordon,
    events, replies), minus what a JetStream consumer delivers there. A push consumer delivers a
    stream's messages to whatever subject its creator names, whether that identity may publish
    there or not (https://github.com/nats-io/nats-server/issues/8274): any role that may read a
    KV bucket and write a key in one could otherwise post, headers and all, on subjects its NATS
    permissions deny it. Such a delivery's reply is an ack subject (`STREAM_DELIVERY`); nobody of
    the fleet publishes on these subjects with one."""

    async def only_published(msg: Msg) -> None:
        if not stream_delivery(msg):
            await cb(msg)

    return only_published


def stream_delivery(msg: Msg) -> bool:
    """Whether ``msg``, heard on a core subscription, is a JetStream consumer's delivery (logged as
    NATS errors are, `_RateLimitedLog`): see `published`."""
    if not msg.reply.startswith(STREAM_DELIVERY):
        return False
    _DROPPED(f"dropped a JetStream consumer's delivery of {msg.subject}")
    return True
