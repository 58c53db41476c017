"""Serve one routed request over raw ASGI: dispatch, then relay the agent's bytes as they come.

The response starts only when the agent's ``head`` arrives (status and content type are Ollama's);
every batch of reply messages becomes one body write. A client that disconnects cancels the work
on the agent. Errors before the head become Ollama-shaped error responses; after it, a final
``{"error": ...}`` line (NDJSON) or ``data:`` event (SSE) ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from corral.gateway.access import TAIL_BYTES
from corral.gateway.asgi import Message, Receive, Send
from corral.gateway.errors import JSON, Dialect, error_body, error_response, native_body
from corral.gateway.metrics import DIRECT, Decision, new_decision, streamed
from corral.gateway.planner import Planner
from corral.gateway.shutdown import MESSAGE as STOP_MESSAGE
from corral.gateway.shutdown import Shutdown
from corral.gateway.spans import record_answer
from corral.protocol.errors import CorralError, InternalError, NoCapacity
from corral.transport import ReplyStream, WorkRequest
from fastapi.responses import Response

log = logging.getLogger(__name__)


async def respond(
    send: Send, status: int, body: bytes, content_type: str = JSON, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole answer; no Content-Type when ``content_type`` is empty (as Ollama's empty 200s)."""
    headers = [(b"content-length", str(len(body)).encode()), *extra]
    if content_type:
        headers.insert(0, (b"content-type", content_type.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_error(
    send: Send, err: CorralError, *, api: Dialect, endpoint: str = "", raw_model: str = ""
) -> None:
    status, body = error_response(err, api=api, endpoint=endpoint, raw_model=raw_model)
    await respond(send, status, body)


async def until_disconnect(receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def relay(
    planner: Planner,
    work: WorkRequest,
    receive: Receive,
    send: Send,
    *,
    api: Dialect = "ollama",
    raw_model: str = "",
    target: str | None = None,
    model_label: str = "",
) -> None:
    """Route ``work`` (to ``target`` when given) and stream the reply, cancelled if the client goes
    or the gateway's stop reaches it (`corral.gateway.shutdown`). ``model_label``: its model as a
    metrics label, when the caller worked it out already."""
    decision, sent = new_decision(model_label), Sent(send)
    serve = _serve(planner, work, sent, decision, api=api, raw_model=raw_model, target=target)

    def stopped() -> None:
        decision.stopped = True

    await _until_gone(serve, receive, sent, planner.shutdown, api, stopped)


async def relay_reply(reply: ReplyStream, receive: Receive, send: Send, shutdown: Shutdown) -> None:
    """Stream a reply that has already begun; the client going away closes (cancels) it."""
    sent = Sent(send)
    async with reply:
        await _until_gone(stream_reply(reply, sent, api="ollama"), receive, sent, shutdown, "ollama")


class Sent:
    """A request's ``send``, remembering whether the response began (and as what content type) and
    whether it ended. A stream's many body writes may go to the server's ``send`` itself
    (`direct`); its start and its last write come through here."""

    __slots__ = ("content_type", "ended", "send", "started", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = self.ended = False
        self.content_type = b""
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.content_type = next((v for k, v in message["headers"] if k == b"content-type"), b"")
        elif not message.get("more_body"):
            self.ended = True
        await self.send(message)


def direct(send: Send) -> Send:
    """The server's own ``send`` under `Sent`s: for a stream's body writes, once it has begun."""
    while isinstance(send, Sent):
        send = send.send
    return send


async def _until_gone(
    work: Coroutine[Any, Any, None],
    receive: Receive,
    sent: Sent,
    shutdown: Shutdown,
    api: Dialect,
    on_stop: Callable[[], None] = lambda: None,
) -> None:
    """Run ``work`` raced against the client's disconnect (a client that goes cancels it) and the
    gateway's stop: once it closes, whatever still runs or waits for a slot is cancelled and ends
    in words (``on_stop`` is told first)."""
    job = asyncio.create_task(work)
    gone = asyncio.create_task(until_disconnect(receive))
    stopped = False
    try:
        # the closing is shared by every request: never cancelled here
        await asyncio.wait((job, gone, shutdown.closing), return_when=asyncio.FIRST_COMPLETED)
        stopped = not (job.done() or gone.done())
        if stopped:
            on_stop()
    finally:
        if not job.done() and not stopped:
            log.info("client went away; cancelling its request")
        for t in (job, gone):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
    if stopped and not sent.ended:  # one that ended meanwhile has said all it had to
        try:
            await _ended_by_stop(sent, api)
        except (OSError, RuntimeError) as e:  # the client went away meanwhile
            log.info("cannot tell a request the gateway stops: %r", e)


async def _ended_by_stop(sent: Sent, api: Dialect) -> None:
    """What a request the gateway's stop cut short is told: 503 when its answer had not begun,
    else a last error line (a ``data:`` event on an SSE stream)."""
    err = NoCapacity(STOP_MESSAGE)
    if not sent.started:
        await respond_error(sent, err, api=api)
        return
    line = _last_line(api, b"text/event-stream" in sent.content_type, err)
    await sent({"type": "http.response.body", "body": line, "more_body": True})
    await sent({"type": "http.response.body", "body": b""})


async def _serve(
    planner: Planner,
    work: WorkRequest,
    send: Send,
    decision: Decision,
    *,
    api: Dialect,
    raw_model: str,
    target: str | None,
) -> None:
    status, agent = 499, ""  # 499: the client went away before an answer (nginx's convention)
    answered = False  # the whole answer went out
    try:
        try:
            if target:
                decision.route = DIRECT
                reply = await planner.send_to(target, work)
            else:
                reply = await planner.send(work, decision=decision)
        except CorralError as e:
            status = e.status
            await respond_error(send, e, api=api, endpoint=work.endpoint, raw_model=raw_model)
            return
        status, agent = reply.status, reply.agent
        async with reply:
            await stream_reply(reply, send, api=api, decision=decision)
        answered = True
    finally:
        if decision.cut:  # begun, then ended with an error line: what ended it
            status = decision.cut
        elif not answered and status < 400:  # begun, then its client left (the relay was cancelled)
            status = 499
        if decision.stopped and status == 499:  # not its client's leaving: the stop answered it 503
            status = 503
        try:  # bookkeeping after the answer: never in the way of the request's own outcome
            planner.metrics.finished(work, decision, status, agent)
            record_answer(decision, agent)
        except Exception:
            log.exception("recording the answer of %s failed", work.endpoint)


async def stream_reply(
    reply: ReplyStream, send: Send, *, api: Dialect, decision: Decision | None = None
) -> None:
    """``decision``: how the request was routed, for the response's X-Corral headers; it is told
    when a streamed body's first byte went out and keeps the body's end (its token counts)."""
    extra = [] if decision is None else decision.headers(reply.agent)
    d = decision or new_decision()
    if reply.ended:
        d.tail = reply.first[-TAIL_BYTES:]  # a whole body (an embedding may be megabytes): its end
        await respond(send, reply.status, reply.first, reply.content_type, extra)
        return
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [(b"content-type", reply.content_type.encode()), *extra]
            if reply.content_type
            else list(extra),
        }
    )
    timing = streamed(reply.content_type)  # time to first token: of streamed bodies only
    last, send = send, direct(send)  # the body's many writes: no wrapper in between
    if reply.first:
        await send({"type": "http.response.body", "body": reply.first, "more_body": True})
        if timing:
            d.first_byte, timing = time.perf_counter(), False
    prev = tail = reply.first

    async def out(batch: bytes) -> None:
        nonlocal prev, tail, timing
        await send({"type": "http.response.body", "body": batch, "more_body": True})
        if timing:
            d.first_byte, timing = time.perf_counter(), False
        prev, tail = tail, batch

    held = b""  # a batch with the answer's last line, sent once the stream's end says none was lost
    try:
        async for batch in reply.batches():
            if held:
                await out(held)  # not the end after all
            held = b""
            if _ends_answer(batch):
                held = batch
            else:
                await out(batch)
        if held:
            await out(held)
    except CorralError as e:
        if partial := _all_but_last(held, "text/event-stream" in reply.content_type):
            await out(partial)  # a client that stops at "done" (or its event) must not take it
        log.warning("stream from agent %s failed: %s", reply.agent, e)
        d.cut = e.status
        await send({"type": "http.response.body", "body": _stream_error(reply, e, api), "more_body": True})
    except Exception as e:  # never leave a client hanging on a half-written stream
        log.exception("relay failed")
        d.cut = 500
        await send(
            {
                "type": "http.response.body",
                "body": _stream_error(reply, InternalError(str(e)), api),
                "more_body": True,
            }
        )
    d.tail = prev[-TAIL_BYTES:] + tail[-TAIL_BYTES:]
    await last({"type": "http.response.body", "body": b""})  # the end, through the `Sent` that notes it


# An answer's last line: Ollama's NDJSON ``"done":true``, or at the start of a line the OpenAI SSE
# ``[DONE]`` event, the Responses API's ``response.completed`` event, Anthropic's ``message_stop``
# (in the text, a quote or a newline is escaped, so never these). The batch holding it waits for
# the stream's end, which comes right after it: a reply that lost messages on the way (a NATS node
# dying) ends with an error line instead, so no client takes a gapped answer for a whole one.
_DONE = b'"done":true'
_SSE_WORDS = (b"data: [DONE]", b"event: response.completed", b"event: message_stop")  # at a line's start
_SSE_LAST = re.compile(rb"(?:^|\n)(?:" + b"|".join(re.escape(w) for w in _SSE_WORDS) + rb")")


def _ends_answer(batch: bytes) -> bool:
    if _DONE in batch:
        return True
    # the expression only where one of its words is (substring tests run at C speed; the
    # expression, tried at every byte of every batch, took several percent of a busy gateway's CPU)
    return any(w in batch for w in _SSE_WORDS) and _SSE_LAST.search(batch) is not None


def _all_but_last(held: bytes, sse: bool) -> bytes:
    """A held batch without the answer's last line (NDJSON), or its last event (SSE: Anthropic's
    ``message_stop`` is two lines, its ``event:`` and its ``data:``)."""
    body = held.rstrip(b"\n")
    if not sse:
        return held[: body.rfind(b"\n") + 1]
    cut = body.rfind(b"\n\n")
    return held[: cut + 2] if cut >= 0 else b""


def _stream_error(reply: ReplyStream, err: CorralError, api: Dialect) -> bytes:
    return _last_line(api, "text/event-stream" in reply.content_type, err)


def _last_line(api: Dialect, sse: bool, err: CorralError) -> bytes:
    """The line that ends a stream with ``err``: an SSE ``data:`` event (Anthropic's ``error`` event
    on /v1/messages), or an NDJSON line."""
    if not sse:
        return native_body(err.message) + b"\n"
    event = b"event: error\n" if api == "anthropic" else b""
    return (
        event
        + b"data: "
        + error_body("openai" if api == "ollama" else api, err.status, err.message)
        + b"\n\n"
    )


class RelayResponse(Response):
    """A FastAPI response that is the agent's reply, streamed through as it comes."""

    def __init__(self, planner: Planner, work: WorkRequest, target: str | None = None) -> None:
        super().__init__()
        self._planner, self._work, self._target = planner, work, target

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await relay(self._planner, self._work, receive, send, target=self._target)


class ReplyResponse(Response):
    """A FastAPI response relaying a reply that has already begun (its head is in hand)."""

    def __init__(self, reply: ReplyStream, shutdown: Shutdown) -> None:
        super().__init__()
        self._reply, self._shutdown = reply, shutdown

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await relay_reply(self._reply, receive, send, self._shutdown)
