"""The registry's long-running loops survive a failing NATS call: a JetStream timeout in the watch
or in the death check is logged, the loop restarts, and a dead agent is still removed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
import pytest
from corral.protocol.messages import AgentEvent, AgentState, agent_state_encoder
from corral.protocol.subjects import Subjects
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.buckets import ensure_buckets
from corral.runtime.kvwatch import snapshot
from corral.runtime.nats import connect
from corral.runtime.natsserver import NatsServer
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

pytestmark = pytest.mark.chaos

HEARTBEAT_S = 0.2


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await connect(nats_server.url, name="test")
    yield conn
    await conn.drain()


def _fail_once(call: Callable[..., Awaitable[Any]], failed: asyncio.Event) -> Callable[..., Awaitable[Any]]:
    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise nats.errors.TimeoutError
        return await call(*args, **kwargs)

    return flaky


@pytest.mark.parametrize("call", ["create", "get"])  # create: the watch (a join); get: the death check
async def test_a_failing_kv_call_does_not_stop_dead_agents_being_removed(
    nats_server: NatsServer, nc: NATS, root: str, call: str
) -> None:
    subjects = Subjects(root)
    buckets = await ensure_buckets(nc.jetstream(), subjects)
    registry = Registry(RegistrySettings(nats_url=nats_server.url, root=root, replica_check_s=0))
    await registry.start()
    views = registry._buckets.views  # type: ignore[union-attr]
    failed = asyncio.Event()
    setattr(views, call, _fail_once(getattr(views, call), failed))
    events: asyncio.Queue[AgentEvent] = asyncio.Queue()

    async def on_event(msg: Msg) -> None:
        events.put_nowait(msgspec.json.decode(msg.data, type=AgentEvent))

    sub = await nc.subscribe(subjects.event("agent"), cb=on_event)
    started = time.time()
    try:
        for _ in range(3):  # a few heartbeats, then silence
            s = AgentState(
                id="a1", vendor="cpu", host="h", ollama_url="http://x",
                started_at=started, updated_at=time.time(), heartbeat_s=HEARTBEAT_S,
            )  # fmt: skip
            await buckets.agents.put("a1", agent_state_encoder.encode(s))
        kinds: list[str] = []
        async with asyncio.timeout(15):
            while (event := await events.get()).kind != "dead":
                kinds.append(event.kind)
        assert failed.is_set()
        assert event.agent == "a1"
        assert kinds == ["joined"]  # announced once, the failed first try included
        assert "a1" not in {e.key for e in await snapshot(buckets.agents)}
    finally:
        await sub.unsubscribe()
        await registry.stop()
