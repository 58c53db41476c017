"""The aggregator's views in the views bucket: a fleet whose merged views outgrow a NATS message
gets the views that fit — ``rates`` first, the one every gateway reads — and is told once which one
could not be written; a quiet fleet's rates are written again all the same; of two copies, the new
one leaves the rates to one that has watched longer, unless that one has stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats
import pytest
from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.protocol.messages import AgentState, TagModel, agent_state_encoder
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets
from corral.runtime.natsserver import NatsServer
from corral.views import RATES_KEY, STATUS_KEY

from tests.integration.waits import views_hold

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 32 * 1024  # a small server limit, so a few dozen agents outgrow it
AGENTS = 200


def state(i: int) -> bytes:
    models = tuple(
        TagModel(name=f"m{j}:latest", model=f"m{j}:latest", modified_at="", size=1, digest=f"d{j}")
        for j in range(3)
    )
    a = AgentState(
        id=f"agent-{i:03d}", vendor="cpu", host=f"host-{i}", ollama_url=f"http://host-{i}", models=models
    )
    return agent_state_encoder.encode(a)


async def test_views_that_fit_are_written_and_an_oversized_one_is_named_once(
    root: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with NatsServer(max_payload=MAX_PAYLOAD) as server:
        nc = await nats.connect(server.url)
        try:
            buckets = await ensure_buckets(nc.jetstream(), Subjects(root))
            for i in range(AGENTS):
                await buckets.agents.put(f"agent-{i:03d}", state(i))
            aggregator = Aggregator(AggregatorSettings(nats_url=server.url, root=root, views_interval_s=0.05))
            with caplog.at_level(logging.WARNING, logger="corral.aggregator.aggregator"):
                await aggregator.start()
                try:
                    await views_hold([aggregator.fleet], lambda v: len(v.agents()) == AGENTS, timeout=10)
                    await aggregator.write()  # and again, as the loop does
                    rates = msgspec.json.decode((await buckets.views.get(RATES_KEY)).value or b"")
                    tags = msgspec.json.decode((await buckets.views.get("tags")).value or b"")
                    assert "requests_per_s" in rates
                    assert {m["name"] for m in tags["models"]} == {"m0:latest", "m1:latest", "m2:latest"}
                    with pytest.raises(nats.js.errors.KeyNotFoundError):
                        await buckets.views.get(STATUS_KEY)  # too large for this server
                finally:
                    await aggregator.stop()
        finally:
            await nc.close()
    warned = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert len([w for w in warned if w.startswith(f"view {STATUS_KEY} ")]) == 1, warned


async def test_a_quiet_fleets_rates_are_written_again_every_interval(
    nats_server: NatsServer, root: str
) -> None:
    """Nothing happens in the fleet, so once its whole window has passed the rates do not change;
    they are written again anyway, since readers take rates older than a few intervals for a
    stopped aggregator's. (A window of a second, the least the rates are taken over: they stand
    still from the first write, as a quiet fleet's do after a minute.)"""
    nc = await nats.connect(nats_server.url)
    try:
        buckets = await ensure_buckets(nc.jetstream(), Subjects(root))
        settings = AggregatorSettings(
            nats_url=nats_server.url, root=root, views_interval_s=0.05, stats_window_s=1.0
        )
        aggregator = Aggregator(settings)
        await aggregator.start()
        try:
            watcher = await buckets.views.watch(RATES_KEY)
            values = []
            async with asyncio.timeout(10):
                while len(values) < 5:
                    entry = await watcher.updates(timeout=5)
                    if entry is not None:  # None: the end of what was there already
                        values.append(entry.value)
            await watcher.stop()
        finally:
            await aggregator.stop()
    finally:
        await nc.close()
    assert len(set(values)) == 1  # the same rates each time: no request, nothing changed


WINDOW_S = 2.0  # the copies' rates window: a new copy has watched all of it after two seconds


@contextlib.asynccontextmanager
async def rates_written(nats_server: NatsServer, root: str) -> AsyncIterator[Callable[[], Awaitable[float]]]:
    """The ``window_s`` of each rates write to the views bucket, the next one per call."""
    nc = await nats.connect(nats_server.url)
    try:
        buckets = await ensure_buckets(nc.jetstream(), Subjects(root))
        watcher = await buckets.views.watch(RATES_KEY)

        async def next_window() -> float:
            while (entry := await watcher.updates(timeout=5)) is None:
                pass  # None: the end of what was there already
            return float(msgspec.json.decode(entry.value or b"{}")["window_s"])

        try:
            yield next_window
        finally:
            await watcher.stop()
    finally:
        await nc.close()


def copy_of(nats_server: NatsServer, root: str) -> Aggregator:
    return Aggregator(
        AggregatorSettings(
            nats_url=nats_server.url, root=root, views_interval_s=0.05, stats_window_s=WINDOW_S
        )
    )


async def test_a_new_aggregator_copy_leaves_the_rates_to_one_that_has_watched_longer(
    nats_server: NatsServer, root: str
) -> None:
    """Two copies run (several are recommended); one started moments ago has watched less of the
    window, and its figures would alternate with the older copy's at every write. It defers to
    them until its own window is full."""
    async with rates_written(nats_server, root) as next_window:
        first = copy_of(nats_server, root)
        await first.start()
        try:
            async with asyncio.timeout(10):
                while await next_window() < WINDOW_S:  # the first copy has watched a whole window
                    pass
            second = copy_of(nats_server, root)
            await second.start()
            try:
                async with asyncio.timeout(10):
                    windows = [await next_window() for _ in range(20)]
                writes = second.writes
            finally:
                await second.stop()
        finally:
            await first.stop()
    assert writes >= 5, writes  # the second copy was writing its other views meanwhile
    assert windows == [WINDOW_S] * 20, windows


async def test_a_new_copy_does_not_defer_to_a_stopped_copys_last_rates(
    nats_server: NatsServer, root: str
) -> None:
    """The copy that wrote the fuller figures has stopped: a new copy writes its own at once, or
    readers would find no live rates until its window filled."""
    async with rates_written(nats_server, root) as next_window:
        first = copy_of(nats_server, root)
        await first.start()
        try:
            async with asyncio.timeout(10):
                while await next_window() < WINDOW_S:
                    pass
        finally:
            await first.stop()
        second = copy_of(nats_server, root)
        await second.start()
        try:
            async with asyncio.timeout(10):
                window = await next_window()
                while window == WINDOW_S:  # the first copy's last writes, still on their way
                    window = await next_window()
        finally:
            await second.stop()
    assert window < WINDOW_S  # the second copy's own, over the time it has watched
