"""One request on the agent: forward it to Ollama and stream the answer back on the reply subject.

Reply stream (see `corral.protocol.headers`): ``claim`` at once, ``ping`` while Ollama is silent
(loading a model), ``head`` with status/content type and the first bytes, header-less ``data``
messages, and ``end`` with the count of data messages and any error. Whatever Ollama sent while the
previous message was being published goes out together (coalescing without timers); nothing is
larger than the NATS payload limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import msgspec
from corral.agent.http import Response
from corral.agent.ollama import OllamaClient
from corral.protocol import headers as H
from corral.protocol.errors import BackendError, Cancelled, CorralError, InternalError, NoCapacity
from corral.runtime.telemetry import client_span, process_span
from nats.aio.client import Client as NATS
from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

HEADROOM = 8 * 1024
_TAIL = 4096  # bytes of a reply kept to read its final token counts from
# A job's claim waits this long for its head: a reply that quick claims with its head, one message
# instead of two (far inside the gateway's claim timeout, which is seconds)
CLAIM_DELAY_S = 0.005


@dataclass(eq=False)
class Job:
    rid: str
    reply: str
    subject: str
    endpoint: str
    method: str
    token: str | None
    body: bytes
    body_size: int | None = None  # set when the body must be fetched from the gateway
    body_subject: str = ""
    deadline_ms: int = 0
    echo_model: str | None = None
    upstream_model: str | None = None
    num_ctx: int = 0  # the request's own options.num_ctx (0 = none: the backend's default)
    unload: bool = False  # keep_alive 0 with nothing to run: what Ollama has loaded changes
    trace: dict[str, str] = field(default_factory=dict)
    last_sent: float = 0.0
    claimed: bool = False  # the gateway knows this agent has it (a claim, or a head that says so)
    claim_timer: asyncio.TimerHandle | None = None
    headed: bool = False
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    slot: asyncio.Future[None] | None = None  # set while queued for a slot
    released: bool = False  # its slot was freed when Ollama's answer ended, before the reply did
    # what the finished request reports for fleet stats (filled in while relaying)
    ran_from: float = 0.0
    ttft_ms: float | None = None
    last_bytes: bytes = b""  # the end of Ollama's reply, where its final counts are


class _Counts(msgspec.Struct):
    eval_count: int = 0
    prompt_eval_count: int = 0
    usage: dict[str, int] | None = None  # /v1 replies


_counts = msgspec.json.Decoder(_Counts)


def reply_counts(tail: bytes) -> tuple[int, int]:
    """(generated, prompt) tokens from the last JSON object in a reply's tail; (0, 0) if absent.

    Native replies end with a line carrying ``eval_count``; /v1 ones may carry ``usage`` (SSE:
    ``data: {...}`` lines before ``data: [DONE]``).
    """
    for line in reversed(tail.split(b"\n")):
        line = line.strip().removeprefix(b"data:").strip()
        if not line.startswith(b"{"):
            continue
        try:
            c = _counts.decode(line)
        except msgspec.DecodeError:
            return 0, 0  # the tail started mid-object: nothing reliable to report
        if c.usage:
            return c.usage.get("completion_tokens", 0), c.usage.get("prompt_tokens", 0)
        return c.eval_count, c.prompt_eval_count
    return 0, 0


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
        self, nc: NATS, ollama: OllamaClient, agent_id: str, *, templates: tuple[str, str], tracer: Tracer
    ) -> None:
        self.nc = nc
        self.ollama = ollama
        self.agent_id = agent_id
        self._direct_template, self._claim_template = templates
        self._tracer = tracer
        # called when Ollama's response headers arrive: a model it had to load is loaded by then
        self.on_response: Callable[[Job, int], None] | None = None  # Ollama's head arrived (status)
        # Ollama's answer has ended; called just before the message that ends the reply, so what
        # it does on NATS (re-arming the freed slot's claim) reaches the server before that message
        self.on_answered: Callable[[Job], Awaitable[None]] | None = None
        self._claiming: set[asyncio.Future[None]] = set()

    async def send(self, job: Job, payload: bytes, headers: dict[str, str] | None) -> None:
        if not job.claimed:
            if headers is not None and headers.get(H.KIND) == H.HEAD:
                # a reply quicker than the claim's delay: its head is the claim too (one message)
                job.claimed = True
                if job.claim_timer is not None:
                    job.claim_timer.cancel()
                headers = {**headers, H.AGENT: self.agent_id, H.REQUEST: job.rid}
            else:
                await self.claim(job)
        job.last_sent = time.monotonic()
        await self.nc.publish(job.reply, payload, headers=headers)

    async def claim(self, job: Job) -> None:
        if job.claimed:
            return
        job.claimed = True
        if job.claim_timer is not None:
            job.claim_timer.cancel()
        job.last_sent = time.monotonic()
        await self.nc.publish(
            job.reply, b"", headers={H.KIND: H.CLAIM, H.AGENT: self.agent_id, H.REQUEST: job.rid}
        )

    def claim_soon(self, job: Job, delay: float = CLAIM_DELAY_S) -> None:
        """Claim ``job`` after ``delay`` unless its head goes out first and claims it."""
        job.last_sent = time.monotonic()  # not silent yet: no ping before the claim is due
        job.claim_timer = asyncio.get_running_loop().call_later(delay, self._claim_due, job)

    def _claim_due(self, job: Job) -> None:
        job.claim_timer = None
        if not job.claimed:
            task = asyncio.ensure_future(self.claim(job))
            self._claiming.add(task)
            task.add_done_callback(self._claiming.discard)

    async def ping(self, job: Job) -> None:
        await self.send(job, b"", {H.KIND: H.PING})

    async def busy(self, reply: str) -> None:
        await self.nc.publish(reply, b"", headers={H.KIND: H.BUSY, H.AGENT: self.agent_id})

    async def fail(self, job: Job, err: CorralError) -> None:
        await self.send(job, b"", {H.KIND: H.END_KIND, H.ERROR_CODE: err.code, H.ERROR: err.message})

    def _limit(self) -> int:
        return self.nc.max_payload - HEADROOM

    def _pieces(self, data: bytes) -> Iterator[bytes]:
        limit = self._limit()
        for i in range(0, len(data), limit):
            yield data[i : i + limit]

    async def _fetch_body(self, job: Job) -> bytes:
        assert job.body_size is not None
        parts, got = [], 0
        while got < job.body_size:
            msg = await self.nc.request(job.body_subject, str(got).encode(), timeout=10)
            if not msg.data:
                raise BackendError("request body no longer available")
            parts.append(msg.data)
            got += len(msg.data)
        return b"".join(parts)

    async def run(self, job: Job) -> int:
        """Execute the job; returns the HTTP status Ollama answered (0 when it never answered)."""
        status = 0
        if job.deadline_ms and time.time() * 1000 > job.deadline_ms:
            await self.fail(job, NoCapacity())
            return status
        template = self._direct_template if ".agent." in job.subject else self._claim_template
        job.ran_from = time.monotonic()
        try:
            with process_span(template, job.subject, job.trace, tracer=self._tracer):
                body = await self._fetch_body(job) if job.body_size is not None else job.body
                with client_span(self._tracer, f"{job.method} {job.endpoint}") as span:
                    async with self.ollama.request(job.method, job.endpoint, body or None) as resp:
                        status = resp.status
                        if self.on_response is not None:
                            self.on_response(job, status)
                        span.set_attribute("http.response.status_code", status)
                        await self._relay(job, resp)
        except asyncio.CancelledError:
            await asyncio.shield(self.fail(job, Cancelled("request canceled")))
            raise
        except (OSError, TimeoutError) as e:
            log.warning("ollama request %s %s failed: %s", job.method, job.endpoint, e)
            await self.fail(job, BackendError(f"ollama unavailable: {e}"))
        except CorralError as e:
            await self.fail(job, e)
        except Exception as e:  # a bug here must still end the client's request, never leave it hanging
            log.exception("request %s %s failed", job.method, job.endpoint)
            await self.fail(job, InternalError(f"agent error: {e}"))
        return status

    async def _relay(self, job: Job, resp: Response) -> None:
        ctype = resp.headers.get("content-type", "application/json; charset=utf-8")
        head = {H.KIND: H.HEAD, H.STATUS: str(resp.status), H.CONTENT_TYPE: ctype}
        rw = (
            EchoRewriter(job.upstream_model, job.echo_model)
            if job.echo_model and job.upstream_model
            else None
        )
        if resp.content_length is not None and resp.content_length <= self._limit():
            data = await resp.read()
            if rw:
                data = rw.feed(data) + rw.flush()
            job.last_bytes = data[-_TAIL:]
            job.ttft_ms = (time.monotonic() - job.ran_from) * 1000
            job.headed = True
            await self._answered(job)
            await self.send(job, data, {**head, H.END: "1"})
            return
        count = 0
        prev = b""
        async for chunk in resp:
            data = rw.feed(chunk) if rw else chunk
            if data:
                prev, job.last_bytes = job.last_bytes, data
            for piece in self._pieces(data):
                if not job.headed:
                    job.ttft_ms = (time.monotonic() - job.ran_from) * 1000
                    job.headed = True
                    await self.send(job, piece, head)
                else:
                    count += 1
                    await self.send(job, piece, None)
        tail = rw.flush() if rw else b""
        job.last_bytes = (prev + job.last_bytes + tail)[-_TAIL:]
        await self._answered(job)
        if not job.headed:
            job.headed = True
            await self.send(job, tail, {**head, H.END: "1"})
            return
        for piece in self._pieces(tail):
            count += 1
            await self.send(job, piece, None)
        await self.send(job, b"", {H.KIND: H.END_KIND, H.SEQ: str(count)})

    async def _answered(self, job: Job) -> None:
        if self.on_answered is not None:
            await self.on_answered(job)
