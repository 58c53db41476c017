"""The load generator's side: keep-alive connections to the gateway, each request sent with the
run's headers (a policy's ``X-Load-Balancing-Strategy``, or none for a peer router), and what each
request measured (`Sample`)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from bench.common import _Conn, connect, post_with_headers

STRATEGY_HEADER = "X-Load-Balancing-Strategy"
REQUEST_TIMEOUT_S = 180.0  # wall seconds; the gateway answers 503 long before (queue timeout)
CUT_OFF = "cut off: the run exceeded its time cap"


def strategy_headers(policy: str) -> dict[str, str]:
    """The headers that ask Corral's gateway for ``policy``."""
    return {STRATEGY_HEADER: policy}


@dataclass
class Sample:
    """One request as the client saw it; times in simulated seconds."""

    model: str
    ok: bool = False
    status: int = 0
    error: str = ""
    t_start: float = 0.0  # since the workload started
    ttft: float = math.nan
    e2e: float = math.nan
    eval_count: int = 0
    prompt_eval_count: int = 0
    prompt_eval_s: float = 0.0
    load_s: float = 0.0
    num_ctx: int | None = None
    conv: int = -1
    turn: int = -1
    run: int = 0  # which repetition (``--repeat``)

    @property
    def error_kind(self) -> str:
        """The error as the tables group it: with the HTTP status when the gateway refused."""
        return f"HTTP {self.status}: {self.error}" if self.status and self.status != 200 else self.error


class Client:
    """One keep-alive connection to the gateway, sending the same headers with every request."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str], scale: float) -> None:
        self.host = host
        self.port = port
        self.headers = dict(headers)
        self.scale = scale
        self.t0 = 0.0  # perf_counter when the workload started (`Clients.timed` sets it)
        self.conn: _Conn | None = None

    async def open(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = await connect(self.host, self.port)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def send(self, path: str, body: dict[str, Any], sample: Sample) -> str:
        """Send, fill ``sample``; returns the reply text (the assistant's content)."""
        raw = post_with_headers(self.host, self.port, path, msgspec.json.encode(body), self.headers)
        try:
            await self.open()
        except OSError as e:
            sample.error = f"connect: {e}"
            return ""
        assert self.conn is not None
        conn = self.conn
        try:
            r = await asyncio.wait_for(conn.request(raw, keep_body=True), REQUEST_TIMEOUT_S)
        except TimeoutError:
            self.close()
            sample.error = f"no complete reply within {REQUEST_TIMEOUT_S:.0f}s"
            return ""
        sample.t_start = (r.t_start - self.t0) / self.scale
        sample.status = r.status
        if r.error:
            self.close()
            sample.error = r.error
            return ""
        sample.ttft = r.ttft / self.scale
        sample.e2e = r.latency / self.scale
        return parse_reply(bytes(conn.body), sample)


class Clients:
    """The connections one workload run opens to the gateway: one set of headers (the policy's, or
    none for a peer router), one workload clock.

    Connections are opened before the clock starts; `timed` runs the workload, cut off after
    ``cap`` wall seconds (requests still open count as errors, requests not sent yet are not
    counted), and closes every connection."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str], scale: float) -> None:
        self.host, self.port, self.headers, self.scale = host, port, dict(headers), scale
        self._opened: list[Client] = []

    async def open(self, n: int) -> list[Client]:
        clients = [Client(self.host, self.port, self.headers, self.scale) for _ in range(n)]
        self._opened += clients
        await asyncio.gather(*(c.open() for c in clients))
        return clients

    async def timed(self, work: Awaitable[Any], samples: Sequence[Sample], cap: float) -> float:
        """Run ``work`` (which fills ``samples``); returns its wall seconds."""
        t0 = time.perf_counter()
        for c in self._opened:
            c.t0 = t0
        try:
            async with asyncio.timeout(cap):
                await work
        except TimeoutError:
            for s in samples:
                if not s.ok and not s.error:
                    s.error = CUT_OFF
        finally:
            for c in self._opened:
                c.close()
        return time.perf_counter() - t0


_line = msgspec.json.Decoder()


def parse_reply(body: bytes, sample: Sample) -> str:
    """Read an NDJSON reply into ``sample``; returns the concatenated reply text."""
    text: list[str] = []
    final: dict[str, Any] | None = None
    for raw in body.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = _line.decode(raw)
        except msgspec.DecodeError:
            sample.error = f"undecodable line: {raw[:80]!r}"
            return ""
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            sample.error = str(obj["error"])[:200]
            return ""
        msg = obj.get("message")
        piece = msg.get("content") if isinstance(msg, dict) else obj.get("response")
        if isinstance(piece, str):
            text.append(piece)
        if obj.get("done"):
            final = obj
    if sample.status != 200:
        sample.error = sample.error or f"HTTP {sample.status}"
        return ""
    if final is None:
        sample.error = "stream ended without a done chunk"
        return ""
    sample.ok = True
    sample.eval_count = int(final.get("eval_count", 0))
    sample.prompt_eval_count = int(final.get("prompt_eval_count", 0))
    sample.prompt_eval_s = int(final.get("prompt_eval_duration", 0)) / 1e9  # simulated already
    sample.load_s = int(final.get("load_duration", 0)) / 1e9
    return "".join(text)
