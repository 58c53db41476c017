"""Shared pieces of the benchmarks: a lean HTTP/1.1 load generator, /proc CPU and memory readings,
child-process handling and table printing.

The load generator is one keep-alive TCP connection per concurrent worker, parsed with httptools
(the C parser uvicorn uses): it costs a few tens of microseconds of CPU per request, so on a small
machine most of the CPU is left to the processes being measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- statistics ------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- HTTP client -----------------------------------------------------------------------------------
@dataclass
class Result:
    status: int = 0
    t_start: float = 0.0
    t_first: float = 0.0  # first response body byte
    t_end: float = 0.0
    body_bytes: int = 0
    lines: int = 0  # newline-terminated lines in the body (NDJSON chunks)
    error: str = ""

    @property
    def latency(self) -> float:
        return self.t_end - self.t_start

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_start


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._result: Result | None = None
        self._done: asyncio.Future[Result] | None = None
        self.closed = False
        self._keep_body = False
        self.body = bytearray()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"bad response: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"connection lost: {exc}")

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        r = self._result
        if r is None:
            return
        if not r.t_first:
            r.t_first = time.perf_counter()
        r.body_bytes += len(body)
        r.lines += body.count(b"\n")
        if self._keep_body:
            self.body += body

    def on_message_complete(self) -> None:
        r, fut = self._result, self._done
        if r is None or fut is None:
            return
        r.t_end = time.perf_counter()
        if not r.t_first:
            r.t_first = r.t_end
        r.status = self._parser.get_status_code()
        self._result = self._done = None
        if not fut.done():
            fut.set_result(r)

    def _fail(self, why: str) -> None:
        r, fut = self._result, self._done
        self._result = self._done = None
        if r is not None and fut is not None and not fut.done():
            r.error = why
            r.t_end = time.perf_counter()
            fut.set_result(r)

    async def request(self, raw: bytes, *, keep_body: bool = False) -> Result:
        if self.closed or self.transport is None:
            return Result(error="connection closed")
        self._keep_body = keep_body
        self.body = bytearray()
        self._done = asyncio.get_running_loop().create_future()
        self._result = Result(t_start=time.perf_counter())
        self.transport.write(raw)
        return await self._done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> _Conn:
    _, proto = await asyncio.get_running_loop().create_connection(_Conn, host, port)
    return proto


def post(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def get(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


async def fetch(host: str, port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body). Raises on connection errors/timeouts."""
    conn = await asyncio.wait_for(connect(host, port), timeout)
    try:
        r = await asyncio.wait_for(conn.request(raw, keep_body=True), timeout)
        if r.error:
            raise ConnectionError(r.error)
        return r.status, bytes(conn.body)
    finally:
        conn.close()


@dataclass
class Phase:
    """The outcome of one closed-loop load phase."""

    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if not r.error and r.status == 200]

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def rps(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def lines(self) -> int:
        return sum(r.lines for r in self.ok)

    def lat_ms(self, q: float) -> float:
        return percentile([r.latency for r in self.ok], q) * 1e3

    def max_ms(self) -> float:
        return max((r.latency for r in self.ok), default=float("nan")) * 1e3

    def slow(self, seconds: float = 1.0) -> int:
        """Requests that took longer than ``seconds``."""
        return sum(1 for r in self.ok if r.latency > seconds)

    def ttft_ms(self, q: float) -> float:
        return percentile([r.ttft for r in self.ok], q) * 1e3


async def closed_loop(
    host: str, port: int, raw: bytes, *, concurrency: int, requests: int, time_cap: float
) -> Phase:
    """``concurrency`` workers, each on its own keep-alive connection, send ``raw`` back to back
    until ``requests`` have been sent in all or ``time_cap`` seconds have passed.

    Connections are opened before the clock starts.
    """
    conns = await asyncio.gather(*(connect(host, port) for _ in range(concurrency)))
    phase = Phase()
    left = requests
    deadline = 0.0

    async def worker(conn: _Conn) -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < deadline:
            left -= 1
            r = await conn.request(raw)
            phase.results.append(r)
            if r.error:
                return

    try:
        t0 = time.perf_counter()
        deadline = t0 + time_cap
        await asyncio.gather(*(worker(c) for c in conns))
        phase.wall_s = time.perf_counter() - t0
    finally:
        for c in conns:
            c.close()
    return phase


# -- /proc readings ----------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        with contextlib.suppress(OSError):
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its reaped children not included); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process in bytes (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    return sum(rss_bytes(p) for p in process_tree(pid))


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({model})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- child processes -------------------------------------------------------------------------------
class Child:
    """A child process in its own session (Ctrl-C at the terminal reaches only the benchmark, which
    then stops its children in order). ``stop`` terminates it, then kills its process group."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: ASYNC230 - a local log file, opened once
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        finally:
            log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its own group


async def wait_port(port: int, child: Child | None, timeout: float) -> None:
    """Until something accepts on 127.0.0.1:port (bounded); fails early if ``child`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited during start:\n{child.log_tail()}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                tail = child.log_tail() if child else ""
                raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s\n{tail}") from None
            await asyncio.sleep(0.05)


# -- tables ----------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:  # None or NaN
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run the benchmark's main coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def post_with_headers(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """Like `post`, with extra request headers (e.g. ``X-Load-Balancing-Strategy``)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
