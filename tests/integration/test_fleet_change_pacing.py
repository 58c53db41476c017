"""Work done on fleet changes is paced: the aggregator's view rewrites gather the changes between
them (at most one per `VIEWS_MIN_S`, and a change that came while a rewrite ran is written by the
next one), and so do the pin keeper's checks (`CHECK_MIN_S`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import corral.aggregator.aggregator as aggregator_module
import corral.registry.pins as pins_module
import msgspec
import nats
import pytest
from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.protocol.messages import AgentState, PsModel, agent_state_encoder
from corral.protocol.subjects import Subjects
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.natsserver import NatsServer
from corral.views import STATUS_KEY, FleetStatus
from nats.js.kv import KeyValue

from tests.integration.waits import Changes, until, views_hold

pytestmark = pytest.mark.integration

LONG_S = 3600.0  # no rewrite on a timer within a test


def agent(agent_id: str) -> bytes:
    runner = PsModel(name="m:latest", model="m:latest", size=1, digest="d", expires_at="", size_vram=1)
    state = AgentState(id=agent_id, vendor="cpu", host="h", ollama_url="http://h", loaded=(runner,))
    return agent_state_encoder.encode(state)


class Rig:
    def __init__(self, aggregator: Aggregator, agents: KeyValue, views: KeyValue) -> None:
        self.aggregator = aggregator
        self.agents = agents
        self.views = views
        self.written = Changes()  # set after every rewrite

    async def in_status(self) -> set[str]:
        """The agents the ``status`` view lists."""
        status = msgspec.json.decode((await self.views.get(STATUS_KEY)).value or b"", type=FleetStatus)
        return {row.id for row in status.agents}

    async def seen(self, agent_id: str) -> None:
        """Until the aggregator's own fleet view has ``agent_id``."""
        await views_hold([self.aggregator.fleet], lambda v: v.get(agent_id) is not None, timeout=10)

    def hook(self, after: Callable[[], Awaitable[None]] | None = None) -> None:
        """Wrap the aggregator's `write`: ``after`` runs once the views are written (a gate that
        holds the rewrite open), then `written` is set."""
        write = self.aggregator.write

        async def wrapped() -> None:
            await write()
            if after is not None:
                await after()
            self.written.set()

        self.aggregator.write = wrapped  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def running(server: NatsServer, root: str, min_s: float) -> AsyncIterator[Rig]:
    """An aggregator whose rewrites are spaced ``min_s`` apart and never come on a timer."""
    aggregator = Aggregator(AggregatorSettings(nats_url=server.url, root=root, views_interval_s=LONG_S))
    nc = await nats.connect(server.url)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(aggregator_module, "VIEWS_MIN_S", min_s)
            await aggregator.start()  # its loop reads the spacing as it starts
        js, subjects = nc.jetstream(), Subjects(root)
        yield Rig(
            aggregator, await js.key_value(subjects.agents_bucket), await js.key_value(subjects.views_bucket)
        )
    finally:
        await aggregator.stop()
        await nc.close()


async def test_fleet_changes_gather_until_the_next_rewrite(nats_server: NatsServer, root: str) -> None:
    async with running(nats_server, root, LONG_S) as rig:
        rig.hook()
        await rig.agents.put("a0", agent("a0"))
        await until(lambda: rig.aggregator.writes == 1, rig.written.wait, timeout=10)
        for i in range(1, 21):
            await rig.agents.put(f"a{i}", agent(f"a{i}"))
        await rig.seen("a20")
        assert rig.aggregator.writes == 1  # twenty changes, no rewrite before `VIEWS_MIN_S` is out
        assert await rig.in_status() == {"a0"}


async def test_a_change_made_during_a_rewrite_is_written_by_the_next(
    nats_server: NatsServer, root: str
) -> None:
    async with running(nats_server, root, 0.0) as rig:
        entered, gate = asyncio.Event(), asyncio.Event()

        async def held() -> None:
            entered.set()
            await gate.wait()

        rig.hook(held)
        await rig.agents.put("first", agent("first"))
        await asyncio.wait_for(entered.wait(), 10)
        await rig.agents.put("second", agent("second"))  # after that rewrite read the fleet
        assert await rig.in_status() == {"first"}
        await rig.seen("second")
        gate.set()
        await until(lambda: _has(rig, "second"), rig.written.wait, timeout=10)


async def _has(rig: Rig, agent_id: str) -> bool:
    return agent_id in await rig.in_status()


async def test_the_pin_keeper_checks_a_burst_of_fleet_changes_once(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pins_module, "CHECK_MIN_S", LONG_S)
    monkeypatch.setattr(pins_module, "CHECK_S", LONG_S)
    registry = Registry(RegistrySettings(nats_url=nats_server.url, root=root))
    nc = await nats.connect(nats_server.url)
    try:
        await registry.start()
        assert registry.pins is not None
        keeper = registry.pins
        agents = await nc.jetstream().key_value(Subjects(root).agents_bucket)
        await agents.put("a0", agent("a0"))
        await views_hold([registry.fleet], lambda v: v.get("a0") is not None, timeout=10)
        for i in range(1, 21):
            await agents.put(f"a{i}", agent(f"a{i}"))
        await views_hold([registry.fleet], lambda v: v.get("a20") is not None, timeout=10)
        assert keeper.rounds == 1  # the check at start; the burst waits out `CHECK_MIN_S`
    finally:
        await registry.stop()
        await nc.close()
