"""A fleet whose merged views outgrow a NATS message: the aggregator writes the views that fit —
``rates`` first, the one every gateway reads — and says once which one it could not write."""

from __future__ import annotations

import logging

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
