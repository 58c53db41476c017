"""`SimServer`: the aiohttp application and its lifecycle.

    async with SimServer(config, host="127.0.0.1", port=0) as sim:
        sim.url, sim.stats, sim.scheduler

Lifecycle NEW → RUNNING → STOPPED; `stop()` is idempotent and safe before `start()`; it stops
accepting, gives in-flight streams `shutdown_timeout` seconds, then cancels them. Handlers are
cancelled when their client disconnects (aiohttp ``handler_cancellation``), which is how a
dropped stream, slot wait or load is noticed and counted.
"""

from __future__ import annotations

import enum
import logging
from types import TracebackType
from typing import Final

from aiohttp import web
from corral.protocol.gohttp import slash_redirect
from corral.simulator.anthropic import AnthropicRoutes
from corral.simulator.config import SimConfig
from corral.simulator.context import SimContext
from corral.simulator.manage import ManageRoutes
from corral.simulator.native import NativeRoutes
from corral.simulator.openai_compat import OpenAIRoutes
from corral.simulator.openai_responses import ResponsesRoutes
from corral.simulator.responses import text_response
from corral.simulator.scheduler import Scheduler
from corral.simulator.stats import SimStats

log = logging.getLogger(__name__)

_PARAMETER_ROUTES: Final = frozenset({"/api/blobs/{digest}", "/v1/models/{model}"})
_PREFIX_ROUTES: Final = tuple(r.partition("{")[0] for r in sorted(_PARAMETER_ROUTES))  # "/api/blobs/", …


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class SimServer:
    """One simulated Ollama server on `host:port` (port 0 picks a free one)."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 11434,
        shutdown_timeout: float = 1.0,
    ) -> None:
        self.config = config if config is not None else SimConfig()
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self.state = State.NEW
        self.ctx = SimContext.build(self.config)
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None

    @property
    def stats(self) -> SimStats:
        return self.ctx.stats

    @property
    def scheduler(self) -> Scheduler:
        return self.ctx.scheduler

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        NativeRoutes(self.ctx).add_to(app)
        ManageRoutes(self.ctx).add_to(app)
        OpenAIRoutes(self.ctx).add_to(app)
        AnthropicRoutes(self.ctx).add_to(app)
        ResponsesRoutes(self.ctx).add_to(app)
        # a path without parameters → the methods it serves (the two with parameters are apart)
        self._methods: dict[str, set[str]] = {}
        for r in app.router.routes():
            if r.resource is not None and r.resource.canonical not in _PARAMETER_ROUTES:
                self._methods.setdefault(r.resource.canonical, set()).add(r.method)
        app.router.add_route("*", "/{tail:.*}", self._fallback)
        return app

    async def _fallback(self, request: web.Request) -> web.StreamResponse:
        """gin's defaults: 405 text for a known path, 301/307 for a trailing slash after a path the
        request's method is routed to, else 404 text."""
        path = request.path
        if path in self._methods or (path.startswith(_PREFIX_ROUTES) and path.count("/") == 3):
            return text_response(405, "405 method not allowed")
        if path[-1:] == "/" and request.method in self._methods.get(
            path[:-1], ()
        ):  # gin: one slash, same method
            query = f"?{request.query_string}" if request.query_string else ""
            status, headers, body = slash_redirect(request.method, path[:-1] + query)
            return web.Response(status=status, headers=headers, body=body)
        return text_response(404, "404 page not found")

    async def start(self) -> None:
        if self.state is not State.NEW:
            raise RuntimeError(f"SimServer is {self.state.value}; it cannot start again")
        self.scheduler.start()
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.shutdown_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self.scheduler.stop()
            self.state = State.STOPPED
            raise
        self._runner = runner
        if self.port == 0:
            self.port = runner.addresses[0][1]
        self.state = State.RUNNING
        log.info(
            "ollama-sim listening on %s (%s, %d GPU(s), time_scale=%s)",
            self.url,
            self.config.vendor,
            len(self.config.gpus),
            self.config.time_scale,
        )

    async def stop(self) -> None:
        if self.state is State.STOPPED:
            return
        if self.state is State.NEW:
            self.state = State.STOPPED
            return
        self.state = State.STOPPED
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self.scheduler.stop()
        log.info("ollama-sim on %s stopped", self.url)

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
