"""The soak's load: a fixed number of aiohttp clients in closed loops, each sending a mix of
streamed and non-streamed Ollama requests, ``/v1/chat/completions`` streams and fleet reads, and
what each request ended as (`Outcome`).

A request **started** when its response status was 200 and its first body byte arrived. Before
that, any failure — a non-200 status, a timeout, a connection error — is a **lost unstarted
request**: Corral promises to route around an agent that dies before the response began, so these
should never happen. After it, an ``{"error": ...}`` line (NDJSON or SSE) or a stream cut before
its last message is a **failure after start**, which is what a client streaming from an agent that
is SIGKILLed sees.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import msgspec

GENERATE_MODEL = "llama3.2"
CHAT_MODEL = "qwen3:8b"
REQUEST_TIMEOUT_S = 120.0  # a whole request; the gateway's own timeouts are far shorter
READ_TIMEOUT_S = 60.0  # silence on an open stream


class Outcome(Enum):
    COMPLETED = "completed"
    FAILED_BEFORE_START = "failed before start"
    FAILED_AFTER_START = "failed after start"


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix."""

    name: str
    method: str
    path: str
    weight: int
    stream: bool = False
    openai: bool = False


KINDS: tuple[Kind, ...] = (
    Kind("generate stream", "POST", "/api/generate", 30, stream=True),
    Kind("chat stream", "POST", "/api/chat", 25, stream=True),
    Kind("v1 chat stream", "POST", "/v1/chat/completions", 15, stream=True, openai=True),
    Kind("generate", "POST", "/api/generate", 10),
    Kind("chat", "POST", "/api/chat", 10),
    Kind("tags", "GET", "/api/tags", 5),
    Kind("ps", "GET", "/api/ps", 5),
)


def body_for(kind: Kind, rng: random.Random, conversations: int = 0) -> dict[str, Any] | None:
    """A request body of ``kind``; None for a GET. ``conversations`` > 0: a chat opens with one of
    that many openings (a steady set of conversations, so the gateway's session cache and the
    sessions bucket reach their working set instead of growing with every request: a leak is then
    growth that goes on); 0: every chat opens anew."""
    if kind.method == "GET":
        return None
    # a conversation's whole opening (its length too) comes from its own seed
    text = (
        random.Random(rng.randrange(conversations)) if conversations and kind.path != "/api/generate" else rng
    )
    n = text.randint(16, 200)
    words = " ".join(
        text.choice(("soak", "fleet", "agent", "stream", "token", "model")) for _ in range(n // 4)
    )
    if kind.openai:
        return {
            "model": CHAT_MODEL,
            "stream": True,
            "max_tokens": n,
            "messages": [{"role": "user", "content": words}],
        }
    if kind.path == "/api/chat":
        return {
            "model": CHAT_MODEL,
            "stream": kind.stream,
            "options": {"num_predict": n},
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": words}],
        }
    return {"model": GENERATE_MODEL, "prompt": words, "stream": kind.stream, "options": {"num_predict": n}}


@dataclass
class Record:
    """One finished request, as the client saw it."""

    kind: str
    outcome: Outcome
    t_end: float  # seconds since the load began
    latency_s: float
    error: str = ""


def _line_error(line: bytes, openai: bool) -> str | None:
    """The error a stream line carries, else None."""
    if openai:
        if not line.startswith(b"data:"):
            return None
        line = line[5:].strip()
        if line == b"[DONE]" or not line:
            return None
    if b'"error"' not in line:
        return None
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    if isinstance(obj, dict) and "error" in obj:
        err = obj["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)
    return None


def _finished(line: bytes, openai: bool) -> bool:
    """Whether ``line`` is a stream's last message (NDJSON ``"done": true``, SSE ``[DONE]``)."""
    if openai:
        return line.strip() == b"data: [DONE]"
    return b'"done":true' in line.replace(b" ", b"")


async def send(
    session: aiohttp.ClientSession, base: str, kind: Kind, rng: random.Random, conversations: int = 0
) -> tuple[Outcome, str]:
    """Send one request of ``kind``; its outcome and, for a failure, what went wrong."""
    body = body_for(kind, rng, conversations)
    data = msgspec.json.encode(body) if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else None
    started = False
    try:
        async with session.request(kind.method, base + kind.path, data=data, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.read())[:200].decode(errors="replace")
                return Outcome.FAILED_BEFORE_START, f"HTTP {resp.status}: {text}"
            if not kind.stream:
                first = await resp.content.readany()
                started = bool(first)
                if not started:
                    return Outcome.FAILED_BEFORE_START, "HTTP 200 with an empty body"
                return _whole(first + await resp.content.read(), kind)
            done = False
            async for line in resp.content:
                started = True
                err = _line_error(line, kind.openai)
                if err is not None:
                    return Outcome.FAILED_AFTER_START, f"error line: {err}"
                done = done or _finished(line, kind.openai)
            if not started:
                return Outcome.FAILED_BEFORE_START, "HTTP 200 with an empty stream"
            if not done:
                return Outcome.FAILED_AFTER_START, "stream ended without its last message"
            return Outcome.COMPLETED, ""
    except (aiohttp.ClientError, TimeoutError) as e:
        what = f"{type(e).__name__}: {e}"
        return (Outcome.FAILED_AFTER_START if started else Outcome.FAILED_BEFORE_START), what


def _whole(raw: bytes, kind: Kind) -> tuple[Outcome, str]:
    """A whole (non-streamed) 200 body: a completed reply, or an error the response carried."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return Outcome.FAILED_AFTER_START, f"not JSON: {raw[:120]!r}"
    if isinstance(obj, dict) and "error" in obj:
        return Outcome.FAILED_AFTER_START, f"error body: {obj['error']}"
    if kind.method == "POST" and not (isinstance(obj, dict) and obj.get("done") is True):
        return Outcome.FAILED_AFTER_START, f"reply without done: {raw[:120]!r}"
    return Outcome.COMPLETED, ""


@dataclass
class Load:
    """``clients`` closed loops against the gateway at ``base`` until `stop` is called."""

    base: str
    clients: int
    seed: int = 1
    conversations: int = 0  # see `body_for`
    records: list[Record] = field(default_factory=list)
    in_flight: int = 0
    t0: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        self.t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            async with asyncio.TaskGroup() as tg:
                for i in range(self.clients):
                    tg.create_task(self._client(session, random.Random(self.seed * 1000 + i)))

    async def _client(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        weights = [k.weight for k in KINDS]
        while not self._stop.is_set():
            kind = rng.choices(KINDS, weights)[0]
            t = time.monotonic()
            self.in_flight += 1
            try:
                outcome, error = await send(session, self.base, kind, rng, self.conversations)
            finally:
                self.in_flight -= 1
            end = time.monotonic()
            self.records.append(Record(kind.name, outcome, end - self.t0, end - t, error))
