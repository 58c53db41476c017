"""A misbehaving Ollama for tests: a reverse proxy in front of a real simulator that passes every
request through, except the model endpoints while a fault is set. Its `/api/ps`, `/api/tags` and
`/api/show` keep answering, as a real Ollama's HTTP server does when only its runner is broken.

Faults (`FaultyOllama.fault`):

- ``"reset"``: the connection is closed before any response (a runner crash under a proxy, a
  load balancer giving up): the agent's HTTP client sees no status line at all;
- ``"500"``: Ollama's own 500 for a runner that died while loading, ``{"error": "llama runner
  process has terminated: exit status 2"}``;
- ``"hang"``: nothing is answered at all (a wedged runner, before its first token);
- ``"stall"``: the real answer's head and first chunk, then nothing (a runner wedged mid-stream);
- ``"down"``: every request, its readings too, closed before any response (the Ollama process
  gone while its port is still taken, or restarting).

`FaultyOllama.hits` counts the model-endpoint requests it received, faulty or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import aiohttp
from aiohttp import web
from corral.protocol.endpoints import MODEL_ENDPOINTS

Fault = Literal["reset", "500", "hang", "stall", "down"] | None
RUNNER_DIED = '{"error":"llama runner process has terminated: exit status 2"}'
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FaultyOllama:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fault: Fault = None
        self.hits = 0
        self.url = ""
        self._session: aiohttp.ClientSession | None = None
        self._released = asyncio.Event()  # set as it stops: the hanging answers end

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.fault == "down":
            self.hits += request.path in MODEL_ENDPOINTS
            assert request.transport is not None
            request.transport.abort()
            return web.Response()  # never written
        if request.path in MODEL_ENDPOINTS:
            self.hits += 1
            if self.fault == "reset":
                assert request.transport is not None
                request.transport.abort()  # no status line: the connection just ends
                return web.Response()  # never written
            if self.fault == "500":
                return web.Response(status=500, text=RUNNER_DIED, content_type="application/json")
            if self.fault == "hang":
                await self._released.wait()
                return web.Response()
        stall = request.path in MODEL_ENDPOINTS and self.fault == "stall"
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=await request.read(), headers=headers
        ) as r:
            out = web.StreamResponse(
                status=r.status, headers={k: v for k, v in r.headers.items() if k.lower() not in _HOP}
            )
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
                if stall:
                    await self._released.wait()
                    return out
            await out.write_eof()
            return out

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[FaultyOllama]:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        async with aiohttp.ClientSession() as self._session:
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            try:
                yield self
            finally:
                self._released.set()
                await runner.cleanup()
