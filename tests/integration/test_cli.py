"""The fleet CLI (corral status|ps|models|pull|drain|uncordon) as a real process against a live fleet."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import pytest
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0, nats_url=nats_server.url, root="cli", sims=default_sims(2, time_scale=0.001)
    )
    async with LocalFleet(options) as f:
        await preload(f, "llama3.2")
        yield f


async def corral(fleet: LocalFleet, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.cli",
        *args,
        "--nats",
        fleet.nats_url,
        "--root",
        "cli",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_status_ps_models(fleet: LocalFleet) -> None:
    rc, out, _ = await corral(fleet, "status", "--json")
    status = json.loads(out)
    assert rc == 0 and status["totals"]["agents"] == 2 and status["totals"]["loaded"] == 2
    assert {a["vendor"] for a in status["agents"]} == {"nvidia", "amd"}
    rc, out, _ = await corral(fleet, "ps", "--json")
    rows = json.loads(out)["models"]
    assert sorted(r["corral"]["agent"] for r in rows) == sorted(a.id for a in fleet.agents)
    rc, out, _ = await corral(fleet, "models", "--json")
    by_name = {m["model"]["name"]: m["agents"] for m in json.loads(out)}
    assert sorted(by_name["llama3.2:latest"]) == sorted(a.id for a in fleet.agents)
    rc, out, _ = await corral(fleet, "status")
    assert rc == 0 and "2 agents (2 active)" in out and "nvidia-0" in out


async def test_pull_with_replicas(fleet: LocalFleet) -> None:
    rc, out, err = await corral(fleet, "pull", "gemma3:4b", "--replicas", "2", "--json")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert lines[-1] == {"status": "success"}
    assert fleet.gateway is not None
    key = parse_name("gemma3:4b").key
    await until(fleet, lambda: len(fleet.gateway.fleet.with_model(key)) == 2)  # type: ignore[union-attr]
    rc, _, err = await corral(fleet, "pull", "no-such-model")
    assert rc == 1 and "file does not exist" in err


async def test_drain_and_uncordon(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    agent = fleet.agents[0].id
    rc, out, _ = await corral(fleet, "drain", agent)
    assert rc == 0 and "draining" in out
    await until(fleet, lambda: fleet.gateway.fleet.get(agent).status == "draining")  # type: ignore[union-attr]
    rc, _, _ = await corral(fleet, "uncordon", agent)
    await until(fleet, lambda: fleet.gateway.fleet.get(agent).status == "active")  # type: ignore[union-attr]
    rc, _, err = await corral(fleet, "drain", "nobody")
    assert rc == 1 and "no agent 'nobody'" in err
