"""A streamed answer across a short NATS restart: what its agent sent while NATS was away is lost
(core NATS keeps nothing for a subscriber that is not there), so the client's stream ends with an
error line where the hole begins, its agent stops generating, and the client never sees text go on
with words missing from its middle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload

pytestmark = pytest.mark.chaos

MODEL = "llama3.2"
BOUND_S = 60.0  # a bound on the test: reconnects back off 2 s at most, the stream runs minutes


@pytest.fixture
async def fleet(server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=server.url,
        root=root,
        # one server, one slot, a reply of minutes at its own pace: the stream outlives the restart
        sims=default_sims(1, time_scale=1.0, num_parallel=1, reply_tokens=[100_000, 100_000]),
        agent={"refresh_s": 0.5, "heartbeat_s": 0.5},
    )
    async with LocalFleet(options) as f:
        await preload(f, MODEL)
        yield f


async def test_a_stream_ends_in_words_where_a_nats_restart_cut_it(
    server: NatsServer, fleet: LocalFleet
) -> None:
    sim = fleet.sims[0]
    finished = sim.stats.finished  # the preload's
    lines: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as http, asyncio.timeout(BOUND_S):
        body = {"model": MODEL, "prompt": "a long story"}
        async with http.post(f"{fleet.url}/api/generate", json=body) as r:
            assert r.status == 200
            restarted = False
            async for raw in r.content:
                if not raw.strip():
                    continue
                lines.append(msgspec.json.decode(raw))
                if len(lines) == 5 and not restarted:  # the stream runs: restart NATS under it
                    await server.kill()
                    await server.start()
                    restarted = True
        # the agent was told to stop: its Ollama's request ends as a client's that went away
        await sim.stats.wait_for(lambda st: st.cancelled >= 1, BOUND_S)
    last = lines[-1]
    assert "error" in last, last
    assert str(last["error"]).startswith("the NATS connection was lost while agent "), last
    assert not any(line.get("done") for line in lines), "a stream cut short never says done"
    assert sim.stats.finished == finished
