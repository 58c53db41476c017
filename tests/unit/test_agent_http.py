"""The agent's lean HTTP/1.1 client against a scripted backend on a real socket, on both event loops.

Each test scripts what the backend writes, byte for byte, so the framings and failures Ollama (or
a proxy before it) can produce are each met: Content-Length, chunked, until-close, interim 1xx,
``Connection: close``, a connection closed while idle, mid-answer, or before answering.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from corral.agent.http import HTTPClient, HTTPError, StatusError, _Connection


@dataclass
class Request:
    line: str
    headers: dict[str, str]
    body: bytes


Script = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@dataclass
class Backend:
    """Answers each request with ``script(request, reader, writer, n)``; False ends the connection."""

    script: Script
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    eof: asyncio.Event = field(default_factory=asyncio.Event)  # a client closed its connection
    server: asyncio.Server | None = None
    url: str = ""

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.url

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.eof.set()
                    return
                line, *rest = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req = Request(line, headers, body)
                self.requests.append(req)
                if not await self.script(req, reader, writer, len(self.requests)):
                    return
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[Backend, HTTPClient]]:
    """A scripted backend and a client to it; both closed on the way out."""
    backend = Backend(script)
    client = HTTPClient(await backend.start())
    try:
        yield backend, client
    finally:
        await client.close()
        await backend.stop()


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def on_loops(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """Run the async scenario once on asyncio's loop and once on uvloop's (the agent's)."""

    @pytest.mark.parametrize("loop", sorted(LOOPS))
    def run(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(asyncio.wait_for(test(), 10))

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


@on_loops
async def test_keep_alive_reuses_one_connection_and_sends_the_backends_host() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(ok(b'{"n":%d}' % n, "Content-Type: application/json\r\n"))
        return True

    async with serving(script) as (backend, client):
        for n in (1, 2, 3):
            async with client.request("POST", "/api/generate", b'{"model":"m"}') as resp:
                assert resp.status == 200
                assert resp.headers["content-type"] == "application/json"
                assert resp.content_length == len(b'{"n":1}')
                assert await resp.read() == b'{"n":%d}' % n
        async with client.request("GET", "/api/tags") as resp:
            assert await resp.read() == b'{"n":4}'
    assert backend.connections == 1
    post, get = backend.requests[0], backend.requests[-1]
    assert post.line == "POST /api/generate HTTP/1.1"
    assert post.headers["host"] == backend.url.removeprefix("http://")
    assert post.headers["content-type"] == "application/json"
    assert "origin" not in post.headers and "accept-encoding" not in post.headers
    assert post.body == b'{"model":"m"}'
    assert get.line == "GET /api/tags HTTP/1.1" and get.body == b"" and "content-length" not in get.headers


@on_loops
async def test_a_chunked_stream_arrives_piece_by_piece_before_it_ends() -> None:
    first_read = asyncio.Event()

    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b'{"response":"a"}\n'))
        await first_read.wait()  # the client has the first piece while the answer is still open
        w.write(chunk(b'{"response":"b"}\n') + chunk(b'{"done":true}\n') + b"0\r\n\r\n")
        return True

    async with serving(script) as (backend, client):
        pieces = []
        async with client.request("POST", "/api/generate", b"{}") as resp:
            assert resp.content_length is None
            async for piece in resp:
                pieces.append(piece)
                first_read.set()
        # what came while the reader was away is handed over as one piece
        assert pieces == [b'{"response":"a"}\n', b'{"response":"b"}\n{"done":true}\n']
        async with client.request("GET", "/") as resp:  # the connection is whole after a chunked body
            assert resp.status == 200
    assert backend.connections == 1


@on_loops
async def test_a_body_that_ends_with_the_connection_and_connection_close_are_not_reused() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        else:
            w.write(ok(b"bye", "Connection: close\r\n"))
        return False  # close after each answer

    async with serving(script) as (backend, client):
        async with client.request("GET", "/") as resp:
            assert await resp.read() == b"until the end"
        for _ in range(2):
            async with client.request("POST", "/api/x", b"{}") as resp:
                assert await resp.read() == b"bye"
    assert backend.connections == 3


@on_loops
async def test_a_reused_connection_closed_unanswered_is_retried_for_get_only() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        if n in (2, 4):
            return False  # read the request, close without a word: a backend timing out an idle link
        w.write(ok(b"fine"))
        return True

    async with serving(script) as (backend, client):
        async with client.request("GET", "/api/ps") as resp:
            await resp.read()
        async with client.request("GET", "/api/ps") as resp:  # #2 is dropped: sent again as #3
            assert await resp.read() == b"fine"
        with pytest.raises(HTTPError, match="closed before the answer"):
            async with client.request("POST", "/api/generate", b"{}"):  # #4: might have run; not resent
                pass
    assert [r.line.split()[0] for r in backend.requests] == ["GET", "GET", "GET", "POST"]


@on_loops
async def test_a_stream_broken_off_raises_after_what_did_arrive() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"part\n"))
        await w.drain()
        return False

    got = []
    async with serving(script) as (backend, client):
        with pytest.raises(HTTPError, match="closed before the answer ended"):
            async with client.request("POST", "/api/generate", b"{}") as resp:
                async for piece in resp:
                    got.append(piece)  # noqa: PERF401  # a comprehension would drop them on the raise
    assert got == [b"part\n"]


@on_loops
async def test_leaving_an_answer_unread_closes_its_connection() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"tok\n"))
        return True  # never ends: a long generation

    async with serving(script) as (backend, client):
        async with client.request("POST", "/api/generate", b"{}") as resp:
            async for _ in resp:
                break  # the client went away: Ollama must hear of it and stop generating
        await backend.eof.wait()
        async with client.request("POST", "/api/generate", b"{}") as resp:
            assert resp.status == 200  # a new connection
    assert backend.connections == 2


@on_loops
async def test_head_interim_and_error_answers() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        if req.line.startswith("HEAD"):
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n")  # a HEAD answer has no body
        elif n == 2:
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after interim"))
        else:
            w.write(
                b'HTTP/1.1 404 Not Found\r\nContent-Length: 32\r\n\r\n{"error":"model \'x\' not found"}\n'
            )
        return True

    async with serving(script) as (backend, client):
        async with client.request("HEAD", "/") as resp:
            assert (resp.status, resp.content_length, await resp.read()) == (200, 17, b"")
        async with client.request("GET", "/") as resp:
            assert (resp.status, await resp.read()) == (200, b"after interim")
        async with client.request("POST", "/api/show", b"{}") as resp:
            with pytest.raises(StatusError) as e:
                await resp.raise_for_status()
        assert e.value.status == 404 and b"not found" in e.value.body


@on_loops
async def test_unreachable_and_garbled_backends_raise_oserrors() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = HTTPClient(f"http://127.0.0.1:{port}")
    with pytest.raises(OSError, match=f"cannot connect to 127.0.0.1:{port}"):
        async with client.request("GET", "/"):
            pass

    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(b"SMTP ready\r\n\r\n")
        return True

    async with serving(script) as (backend, client):
        with pytest.raises(HTTPError, match="malformed HTTP answer"):
            async with client.request("GET", "/"):
                pass


@on_loops
async def test_a_large_request_body_arrives_whole() -> None:
    async def script(req: Request, r: Any, w: asyncio.StreamWriter, n: int) -> bool:
        w.write(ok(str(len(req.body)).encode()))
        return True

    body = b'{"prompt":"' + b"x" * (8 * 1024 * 1024) + b'"}'
    async with serving(script) as (backend, client):
        async with client.request("POST", "/api/generate", body) as resp:
            assert await resp.read() == str(len(body)).encode()
    assert backend.requests[0].body == body


class _Transport:
    """Records what the protocol asks of its transport."""

    def __init__(self) -> None:
        self.paused = False
        self.written = b""

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_a_reader_that_falls_behind_stops_the_socket_not_memory() -> None:
    conn = _Connection()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    head = conn.send(b"GET / HTTP/1.1\r\n\r\n", no_body=False)
    size = 2 * 1024 * 1024
    conn.data_received(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
    resp = await head
    conn.data_received(b"x" * (256 * 1024))
    assert not transport.paused
    conn.data_received(b"x" * (512 * 1024))  # over the high-water mark, unread
    assert transport.paused
    assert len(await conn.next_piece()) == 768 * 1024
    assert not transport.paused  # read: the socket reads again
    conn.data_received(b"x" * (size - 768 * 1024))
    assert len(await resp.read()) == size - 768 * 1024
    assert conn.done and conn.reusable
