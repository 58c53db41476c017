"""Helpers for tests that run a whole local fleet (LocalFleet: NATS, simulators, agents, gateway)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import nats.aio.msg
from corral.protocol.messages import AgentEvent
from corral.runtime.natsserver import NatsServer
from corral.up import LocalFleet

from tests.integration import waits

if TYPE_CHECKING:
    from corral.gateway.app import Gateway


async def until(
    fleet: LocalFleet, predicate: Callable[[], bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Wait until ``predicate()`` holds, woken by each change to the fleet's KV state (no polling)."""
    assert fleet.gateway is not None
    await waits.until(predicate, fleet.gateway.fleet.wait_changed, timeout=timeout, what=what)


async def preload(fleet: LocalFleet, model: str, timeout: float = 10.0) -> None:
    """Load ``model`` on every simulated backend directly, to stay (``keep_alive: -1``: Ollama's
    default five minutes are moments at a test's time scale, and agents read an expiry when it
    comes), and wait until every agent advertises it."""
    import ollama
    from corral.protocol.names import parse_name

    async def load(url: str) -> None:
        async with ollama.AsyncClient(host=url) as c:
            await c.generate(model=model, prompt="", keep_alive=-1)

    await asyncio.gather(*(load(s.url) for s in fleet.sims))
    for a in fleet.agents:
        a._wake.refresh.set()
    key = parse_name(model).key
    assert fleet.gateway is not None
    await until(fleet, lambda: len(fleet.gateway.fleet.loaded_on(key)) == len(fleet.agents), timeout)  # type: ignore[union-attr]


async def generate(url: str, **kwargs: object) -> object:
    """One ``/api/generate`` through the official client, closing its connection pool afterwards."""
    import ollama

    async with ollama.AsyncClient(host=url) as c:
        return await c.generate(**kwargs)  # type: ignore[arg-type]


class Events:
    """Every agent event on a root, as they arrive (subscribe `on` to `Subjects.event("agent")`)."""

    def __init__(self) -> None:
        self.seen: list[AgentEvent] = []
        self._changes = waits.Changes()

    async def on(self, msg: nats.aio.msg.Msg) -> None:
        self.seen.append(msgspec.json.decode(msg.data, type=AgentEvent))
        self._changes.set()

    def of(self, kind: str, agent: str) -> int:
        return sum(1 for e in self.seen if e.kind == kind and e.agent == agent)

    async def wait(self, kind: str, agent: str, count: int = 1, timeout: float = 10.0) -> None:
        await waits.until(
            lambda: self.of(kind, agent) >= count,
            self._changes.wait,
            timeout=timeout,
            what=f"{count} {kind!r} event(s) of agent {agent}",
            state=lambda: [(e.kind, e.agent) for e in self.seen],
        )


async def publish_raw(server: NatsServer, subject: str, reply: bytes, payload: bytes) -> None:
    """Publish over the bare NATS protocol, which (unlike nats-py) can send any bytes as a reply
    subject: what a hostile or broken client can do."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n')
        writer.write(b"PUB %s %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), reply, len(payload), payload))
        async with asyncio.timeout(5):
            assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


async def queue_and_serve(fleet: LocalFleet, model: str, n: int, num_predict: int) -> None:
    """Put ``n`` generate requests for ``model`` in the fleet queue exactly as a gateway queues
    them (each with its nudge), then wait until every one has been answered (its head arrived on
    its own reply subject)."""
    from corral.protocol import headers as H
    from corral.protocol.names import parse_name
    from corral.runtime.workqueue import enqueue

    gw = fleet.gateway
    assert gw is not None and gw.nc is not None
    subjects, token = gw.subjects, parse_name(model).token
    reply = f"{subjects.root}.reply.test.{gw.nc.new_inbox().rsplit('.', 1)[-1]}"
    replies = await gw.nc.subscribe(reply + ".*")
    deadline = str(int((time.time() + 60) * 1000))
    for i in range(n):
        body = msgspec.json.encode(
            {"model": model, "prompt": f"q{i}", "stream": False, "options": {"num_predict": num_predict}}
        )
        headers = {H.REQUEST: f"r{i}", H.ENDPOINT: "/api/generate", H.MODEL: token, H.DEADLINE: deadline}
        await enqueue(
            gw.nc, gw.nc.jetstream(), subjects, "any", token, body, headers | {H.REPLY: f"{reply}.{i}"}
        )
    heads = 0
    while heads < n:
        msg = await replies.next_msg(timeout=20)
        heads += (msg.headers or {}).get(H.KIND) == H.HEAD
    await replies.unsubscribe()


async def seen(gw: Gateway, key: str, present: bool = True, timeout: float = 5.0) -> None:
    """Wait until ``gw`` knows API key ``key`` (or, with ``present`` False, no longer knows it)."""
    keys = gw.access.keys if gw.access is not None else None
    assert keys is not None
    await waits.until(
        lambda: (keys.lookup(key) is not None) == present,
        keys.wait_changed,
        timeout=timeout,
        what=f"the gateway {'knows' if present else 'no longer knows'} the API key",
    )


class AsgiSink:
    """An ASGI ``send`` that keeps what a response sent (for `corral.gateway.relay.stream_reply`)."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    async def __call__(self, event: dict[str, object]) -> None:
        self.events.append(event)

    @property
    def body(self) -> bytes:
        """The response body: every body part, joined."""
        parts = (e.get("body", b"") for e in self.events if e["type"] == "http.response.body")
        return b"".join(p for p in parts if isinstance(p, bytes))
