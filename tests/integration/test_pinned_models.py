"""Models kept warm against a real fleet: ``corral pin`` loads a model on N agents to stay
(``keep_alive: -1``), the registry loads it again elsewhere when one of them stops, ``/api/status``
and ``corral status`` show the pin, and after ``corral unpin`` nothing is placed again."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from corral.agent.agent import Agent
from corral.protocol.messages import AgentState
from corral.protocol.names import key_of
from corral.runtime.fleet import FleetView
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration import waits
from tests.integration.cli_helpers import corral, corral_ok

pytestmark = pytest.mark.integration

PINNED = "llama3.2:1b"
EMBEDDING = "all-minilm:latest"
MODELS = [
    {"name": PINNED, "size_gb": 1.3, "parameter_size": "1.2B"},
    {"name": EMBEDDING, "size_gb": 0.046, "family": "bert", "capabilities": ["embedding"]},
]
WAIT_S = 20.0


async def cli(fleet: LocalFleet, root: str, *args: str) -> str:
    """Run ``corral ARGS`` as a person would; its standard output (it must succeed)."""
    return await corral_ok(*args, "--nats", fleet.nats_url, "--root", root)


async def until(
    view: FleetView, predicate: Callable[[list[AgentState]], bool], timeout: float = WAIT_S
) -> None:
    await waits.until(
        lambda: predicate(view.agents()),
        view.wait_changed,
        timeout=timeout,
        what=waits.describe(predicate),
        state=lambda: sorted(a.id for a in view.agents()),
    )


def runners(agents: list[AgentState], model: str = PINNED) -> dict[str, str]:
    """Agent id → the expiry of its runner of ``model`` (active agents only)."""
    return {
        a.id: m.expires_at
        for a in agents
        if a.status == "active"
        for m in a.loaded
        if key_of(m.name) == model
    }


def kept(agents: list[AgentState], model: str = PINNED) -> set[str]:
    return {a for a, expires in runners(agents, model).items() if expires[:4] >= "2100"}


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(3, time_scale=0, models=MODELS),  # no delays, and no keep_alive timers
        agent={"heartbeat_s": 0.5},
    )
    async with LocalFleet(options) as fleet:
        assert fleet.registry is not None
        await until(fleet.registry.fleet, lambda agents: len(agents) == 3)
        yield fleet


async def sim_ps(url: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/ps") as r:
        return {m["name"]: m["expires_at"] for m in (await r.json())["models"]}


async def test_a_pinned_model_stays_loaded_on_n_agents_until_it_is_unpinned(
    fleet: LocalFleet, root: str
) -> None:
    assert fleet.registry is not None and fleet.registry.pins is not None
    view, keeper = fleet.registry.fleet, fleet.registry.pins
    rc, out, err = await corral(
        "pin", "llama3.2:1b", "--replicas", "2", "--nats", fleet.nats_url, "--root", root
    )
    assert rc == 0 and PINNED in out and "2" in out
    assert "no registry keeps the pins" not in err  # the fleet's registry took the keeper lease

    await until(view, lambda agents: len(kept(agents)) == 2)
    first = kept(view.agents())
    by_id: dict[str, Agent] = {a.id: a for a in fleet.agents}
    for agent_id in first:  # each simulator says so itself: loaded to stay
        expires = await sim_ps(by_id[agent_id].settings.ollama_url)
        assert expires[PINNED][:4] >= "2100"
    (third,) = set(by_id) - first

    gone = sorted(first)[0]
    await by_id[gone].stop()
    await until(view, lambda agents: kept(agents) == first - {gone} | {third})

    async with aiohttp.ClientSession() as s, s.get(f"{fleet.url}/api/status") as r:
        status = await r.json()
    assert status["pins"] == [
        {
            "model": PINNED,
            "replicas": 2,
            "vendor": None,
            "loaded": 2,
            "agents": sorted(first - {gone} | {third}),
        }
    ]
    shown = json.loads(await cli(fleet, root, "status", "--json"))
    assert [(p["model"], p["replicas"], p["loaded"]) for p in shown["pins"]] == [(PINNED, 2, 2)]
    assert "pinned: llama3.2:1b on 2/2 agents" in await cli(fleet, root, "status")

    assert "no pins" in await cli(fleet, root, "unpin", PINNED)
    # the keeper gives the holders their default keep_alive back: their runners would expire again
    await until(view, lambda agents: not kept(agents) and len(runners(agents)) == 2)
    started = keeper.loads_started
    await by_id[sorted(first - {gone} | {third})[0]].stop()
    await until(view, lambda agents: len(agents) == 1)
    await keeper.check()
    assert keeper.loads_started == started  # nothing placed again


async def test_a_pinned_embedding_model_is_loaded_too(fleet: LocalFleet, root: str) -> None:
    """An embedding model refuses Ollama's load-only generate ("does not support generate"): the
    keeper loads it with an empty embed instead, where it used to retry that 400 for ever, and
    asks for no generate first where the Ollama lists the model's capabilities."""
    assert fleet.registry is not None
    view = fleet.registry.fleet
    await cli(fleet, root, "pin", EMBEDDING, "--replicas", "2")
    await until(view, lambda agents: len(kept(agents, EMBEDDING)) == 2)
    by_id: dict[str, Agent] = {a.id: a for a in fleet.agents}
    for agent_id in kept(view.agents(), EMBEDDING):
        assert (await sim_ps(by_id[agent_id].settings.ollama_url))[EMBEDDING][:4] >= "2100"
    assert [sim.stats.unsupported for sim in fleet.sims] == [0, 0, 0]


async def test_a_pin_with_no_registry_running_says_it_waits_for_one(
    nats_server: NatsServer, root: str
) -> None:
    """Nothing loads a pin but a registry: with none running, `corral pin` keeps the pin and says
    so, where it used to answer as if the model were being loaded."""
    rc, _, err = await corral("status", "--nats", nats_server.url, "--root", root)  # the setup step
    assert rc == 0, err
    rc, out, err = await corral("pin", PINNED, "--nats", nats_server.url, "--root", root)
    assert rc == 0 and PINNED in out
    assert "no registry keeps the pins now" in err and "loads once `corral registry` runs" in err
    assert f"0 agent(s) have {PINNED} on disk, 1 wanted" in err  # no agent at all
