"""One request on the agent: forward it to Ollama and stream the answer back on the reply subject.

The reply stream is written by `corral.transport.replies.ReplyWriter`: ``claim`` (or a quick head
that claims), ``ping`` while Ollama is silent (loading a model), ``head`` with status/content type
and the first bytes, header-less ``data`` messages, and ``end`` with the count of data messages and
any error. Whatever Ollama sent while the previous message was being published goes out together
(coalescing without timers); nothing is larger than the NATS payload limit.

A request body larger than one NATS message (``Corral-Body-Size``) stays with its sender and is
streamed from there into the Ollama request chunk by chunk (`corral.transport.bodies`), so a blob
upload of any size passes through the agent without being held whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import msgspec
from corral.agent.ollama import Answer, OllamaClient
from corral.agent.probes import Probes
from corral.protocol.endpoints import MODEL_ENDPOINTS
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.errors import BackendError, Cancelled, CorralError, InternalError, NoCapacity
from corral.protocol.messages import RequestFinished
from corral.protocol.names import decode_token
from corral.runtime.telemetry import client_span, process_span, set_model, set_usage
from corral.transport.bodies import fetch_body
from corral.transport.replies import ReplyWriter
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

_TAIL = 4096  # bytes of a reply kept to read its final token counts from


@dataclass(eq=False)
class Job:
    """One request taken by the agent: its envelope, body and reply stream, and what it reports."""

    env: RequestEnvelope
    subject: str  # where it was delivered (direct, a claim subject, or the fleet queue)
    body: bytes
    out: ReplyWriter
    body_subject: str = ""  # where a body larger than the payload limit is fetched from
    task: asyncio.Task[None] | None = None
    slot: asyncio.Future[None] | None = None  # set while it waits here for a slot
    released: bool = False  # its slot was freed when Ollama's answer ended, before the reply did
    started: bool = False  # its task has begun to run
    cancel_on_start: bool = False  # cancelled before that: it ends as cancelled when it starts
    failure: CorralError | None = None  # why it was cancelled, when not at its sender's request
    # what the finished request reports for fleet stats (filled in while relaying)
    ran_from: float = 0.0
    ttft_ms: float | None = None
    last_bytes: bytes = b""  # the end of Ollama's reply, where its final counts are
    probes: Probes = field(default_factory=Probes)  # whether its requester is still there

    @property
    def rid(self) -> str:
        return self.env.rid

    @property
    def token(self) -> str | None:
        return self.env.model

    @property
    def held(self) -> bool:
        """Its reply waits for its requester to take what was sent (a slow client): not a stall."""
        return self.out.held

    @property
    def slot_token(self) -> str | None:
        """The model whose slot it holds, for its slot time: a model request's, not a pull's,
        a show's or an unload's."""
        env = self.env
        return env.model if env.endpoint in MODEL_ENDPOINTS and not env.unload else None

    @property
    def streams(self) -> bool:
        return self.env.stream

    @property
    def reply(self) -> str:
        return self.out.reply

    def cancel(self) -> None:
        """Stop this job's task. A task cancelled before its first step never runs its body, not
        even its ``finally``: the reply would stay open and the slot held for good. A job not yet
        started is marked instead, and its task ends it as cancelled as soon as it runs."""
        if self.task is None or self.task.done():
            return
        if self.started:
            self.task.cancel()
        else:
            self.cancel_on_start = True

    def fail(self, error: CorralError) -> None:
        """End this job with ``error`` (its reply says so) instead of a cancellation."""
        self.failure = self.failure or error
        self.cancel()

    async def end_reply(self, error: CorralError) -> None:
        """End the reply with ``error`` unless it has ended already."""
        try:
            await asyncio.shield(self.out.end(error))
        except (NatsError, asyncio.CancelledError) as e:
            log.warning("cannot end request %s: %r", self.rid, e)

    @property
    def ending(self) -> CorralError:
        """What a cancelled job's reply ends with."""
        return self.failure or Cancelled("request canceled")


class _Counts(msgspec.Struct):
    eval_count: int = 0
    prompt_eval_count: int = 0
    usage: dict[str, int] | None = None  # /v1 replies
    done_reason: str = ""


_counts = msgspec.json.Decoder(_Counts)


class _Timings(msgspec.Struct):
    load_duration: int = 0  # nanoseconds, by Ollama's clock
    total_duration: int = 0
    done_reason: str = ""


_timings = msgspec.json.Decoder(_Timings)


def reply_load_s(tail: bytes, elapsed_s: float) -> float | None:
    """Seconds the model's load took for a request whose reply ends with ``tail`` and that took
    ``elapsed_s`` here; None when the reply does not say (/v1 replies, a cut-off tail).

    A load-only reply (an empty prompt: ``done_reason`` ``load``) comes when the load ends, so the
    request's own time is the load's. Other native replies carry ``load_duration`` and
    ``total_duration`` by Ollama's clock: the load's share of the request's time, taken on ours
    (the same with Ollama, and right too with a simulator whose clock runs faster).
    """
    for line in reversed(tail.split(b"\n")):
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            t = _timings.decode(line)
        except msgspec.DecodeError:
            return None
        if t.done_reason == "load":
            return elapsed_s
        if t.load_duration > 0 and t.total_duration >= t.load_duration:
            return elapsed_s * t.load_duration / t.total_duration
        return None
    return None


def ran_seconds(job: Job) -> float:
    """Seconds since ``job`` was sent to Ollama (0 before it was)."""
    return time.monotonic() - job.ran_from if job.ran_from else 0.0


def load_seconds(job: Job) -> float | None:
    """`reply_load_s` of a finished job's reply."""
    return reply_load_s(job.last_bytes, ran_seconds(job)) if job.ran_from else None


def reply_counts(tail: bytes) -> tuple[int, int]:
    """(generated, prompt) tokens from the last JSON object in a reply's tail; (0, 0) if absent.

    Native replies end with a line carrying ``eval_count``; /v1 ones may carry ``usage`` (SSE:
    ``data: {...}`` lines before ``data: [DONE]``).
    """
    c = _last_object(tail)
    if c is None:
        return 0, 0
    if c.usage:
        return c.usage.get("completion_tokens", 0), c.usage.get("prompt_tokens", 0)
    return c.eval_count, c.prompt_eval_count


def loads_only(tail: bytes) -> bool:
    """Whether a reply is Ollama's answer to a load or an unload (``done_reason`` ``load`` or
    ``unload``: an empty prompt, a preload, ``ollama stop``), not to a request that ran the model."""
    c = _last_object(tail)
    return c is not None and c.done_reason in ("load", "unload")


def _last_object(tail: bytes) -> _Counts | None:
    for line in reversed(tail.split(b"\n")):
        line = line.strip().removeprefix(b"data:").strip()
        if not line.startswith(b"{"):
            continue
        try:
            return _counts.decode(line)
        except msgspec.DecodeError:
            return None  # the tail started mid-object: nothing reliable to report
    return None


_finished = msgspec.json.Encoder()


def finished_event(job: Job, agent_id: str, status: int) -> bytes:
    """The ``events.request`` message for a finished model request (what the rates are made of)."""
    assert job.token is not None
    generated, prompt = reply_counts(job.last_bytes) if status == 200 else (0, 0)
    event = RequestFinished(
        agent=agent_id,
        model=decode_token(job.token),
        endpoint=job.env.endpoint,
        status=status,
        ttft_ms=None if job.ttft_ms is None else round(job.ttft_ms, 3),
        duration_ms=round(ran_seconds(job) * 1000, 3),
        eval_count=generated,
        prompt_eval_count=prompt,
    )
    return _finished.encode(event)


async def report_finished(nc: NATS, subject: str, job: Job, agent_id: str, status: int) -> None:
    """Publish ``job``'s `finished_event` on ``subject``; a failure is logged, not raised. A load or
    an unload is none: its seconds of loading are no request's time to first token."""
    if status == 200 and loads_only(job.last_bytes):
        return
    try:
        await nc.publish(subject, finished_event(job, agent_id, status))
    except NatsError as e:
        log.warning("cannot report request %s: %s", job.rid, e)


async def report_failed(nc: NATS, subject: str, job: Job, agent_id: str) -> None:
    """A job ended by a failure of its own (a stall, its drain grace running out), not by its client
    leaving: one `report_finished` with the failure's status, as the fleet's error rate counts."""
    if job.token is not None and job.failure is not None:
        await report_finished(nc, subject, job, agent_id, job.failure.status)


async def _ended(out: ReplyWriter, error: CorralError) -> int:
    """End ``out`` with ``error``; its status, as the request's."""
    await out.end(error)
    return error.status


class EchoRewriter:
    """Put the client's model spelling back into Ollama's replies when a vendor pin was stripped.

    Works on whole lines (NDJSON and SSE are line-based); a partial line waits for its end.
    """

    def __init__(self, upstream: str, echo: str) -> None:
        self._from = b'"model":' + msgspec.json.encode(upstream)
        self._to = b'"model":' + msgspec.json.encode(echo)
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        data = self._tail + data
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        return data[:cut].replace(self._from, self._to)

    def flush(self) -> bytes:
        out, self._tail = self._tail.replace(self._from, self._to), b""
        return out


class Worker:
    """Runs jobs against one Ollama; owns no routing decisions."""

    def __init__(
        self,
        nc: NATS,
        ollama: OllamaClient,
        *,
        templates: tuple[str, str],
        tracer: Tracer,
        on_response: Callable[[Job, int], None],
        on_answered: Callable[[Job], Awaitable[None]],
    ) -> None:
        """``on_response``: Ollama's head arrived (with its status) — a model it had to load is
        loaded by then; status 0: Ollama did not answer (refused the connection, reset it). ``on_answered``: Ollama's answer has ended; called just before the message
        that ends the reply, so what it does on NATS (re-arming the freed slot's claim) reaches the
        server before that message."""
        self.nc = nc
        self.ollama = ollama
        self._direct_template, self._claim_template = templates
        self._tracer = tracer
        self.on_response = on_response
        self.on_answered = on_answered

    def _call(self, job: Job) -> AbstractAsyncContextManager[Answer]:
        """``async with`` Ollama's answer to the job: a large body (one that did not fit in a NATS
        message, a blob upload) is streamed from its sender into the request as it comes, never
        joined here (`corral.transport.bodies.fetch_body`)."""
        env = job.env
        if env.body_size is None:
            return self.ollama.request(env.method, env.endpoint, job.body or None)
        chunks = fetch_body(self.nc, job.body_subject, env.body_size)
        return self.ollama.upload(env.method, env.endpoint, chunks, env.body_size)

    async def run(self, job: Job) -> int:
        """Execute the job; returns the status it ended with: Ollama's, or that of the failure that
        ended it (a `BackendError`'s 502 for an answer Ollama cut short or never gave), so that an
        answer begun with 200 and cut is no success in the fleet's figures.

        Every way it can end ends its reply stream: a failure with its error, a cancellation with
        ``cancelled``, a bug in here with ``internal`` (logged with its traceback)."""
        env, out = job.env, job.out
        status = 0
        if env.deadline_ms and time.time() * 1000 > env.deadline_ms:
            await out.end(NoCapacity())
            return status
        template = self._direct_template if ".agent." in job.subject else self._claim_template
        job.ran_from = time.monotonic()
        try:
            with process_span(template, job.subject, env.trace, tracer=self._tracer):
                with client_span(self._tracer, f"{env.method} {env.endpoint}") as span:
                    if job.token is not None:
                        set_model(span, env.endpoint, decode_token(job.token))
                    async with self._call(job) as resp:
                        status = resp.status
                        self.on_response(job, status)
                        span.set_attribute("http.response.status_code", status)
                        await self._relay(job, resp)
                    if span.is_recording():
                        generated, prompt = reply_counts(job.last_bytes)
                        set_usage(span, prompt=prompt, generated=generated, ttft_ms=job.ttft_ms)
        except asyncio.CancelledError:
            await asyncio.shield(out.end(job.ending))
            raise
        except (OSError, TimeoutError) as e:
            log.warning("ollama request %s %s failed: %s", env.method, env.endpoint, e)
            if not status:
                self.on_response(job, 0)  # it did not answer at all
            return await _ended(out, BackendError(f"ollama unavailable: {e}"))
        except NatsError as e:  # the body could not be fetched, or the reply not sent
            log.warning("request %s %s: %s", env.method, env.endpoint, e)
            return await _ended(out, BackendError(f"request transport failed: {e}"))
        except CorralError as e:
            return await _ended(out, e)
        except Exception as e:  # a bug here must still end the client's request, never leave it hanging
            log.exception("request %s %s failed", env.method, env.endpoint)
            return await _ended(out, InternalError(f"agent error: {e}"))
        return status

    async def _relay(self, job: Job, resp: Answer) -> None:
        out = job.out
        ctype = resp.headers.get("content-type", "")  # none for Ollama's empty 200s (copy, delete)
        rw = (
            EchoRewriter(job.env.upstream_model, job.env.echo_model)
            if job.env.echo_model and job.env.upstream_model
            else None
        )
        if resp.content_length is not None and resp.content_length <= out.limit:
            data = await resp.read()
            if rw:
                data = rw.feed(data) + rw.flush()
            job.last_bytes = data[-_TAIL:]
            job.ttft_ms = (time.monotonic() - job.ran_from) * 1000
            await self.on_answered(job)
            await out.head(resp.status, ctype, data, end=True)
            return
        prev = b""
        async for chunk in resp:
            data = rw.feed(chunk) if rw else chunk
            if not data:
                continue
            prev, job.last_bytes = job.last_bytes, data
            if out.headed:
                await out.data(data)
            else:
                job.ttft_ms = (time.monotonic() - job.ran_from) * 1000
                await out.head(resp.status, ctype, data)
        tail = rw.flush() if rw else b""
        job.last_bytes = (prev + job.last_bytes + tail)[-_TAIL:]
        await self.on_answered(job)
        if not out.headed:
            await out.head(resp.status, ctype, tail, end=True)
            return
        await out.data(tail)
        await out.end()
