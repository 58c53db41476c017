"""The console's HTTP side on a real fleet with API keys on: its pages answer without a key, its
admin calls (drain, cordon, uncordon, unload) are refused to a user key and work with an admin key,
and `whoami` tells the page which role it has. The page itself is tested in Chromium
(`tests/integration/test_console.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from corral.gateway.keys import create_key, open_key_buckets
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from yarl import URL

from tests.integration.cli_helpers import corral
from tests.integration.fleet_helpers import preload, seen, until

pytestmark = pytest.mark.integration

ROOT = "console"
MODEL = "llama3.2"


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=ROOT,
        sims=default_sims(2, time_scale=0.01),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"auth": "keys"},
    )
    async with LocalFleet(options) as f:
        yield f


@pytest.fixture(scope="module")
async def keys(fleet: LocalFleet) -> dict[str, str]:
    """An admin and a user key, seen by the gateway."""
    assert fleet.gateway is not None and fleet.gateway.nc is not None and fleet.gateway.access is not None
    buckets = await open_key_buckets(fleet.gateway.nc.jetstream(), Subjects(ROOT))
    made = {role: await create_key(buckets.keys, f"console-{role}", role=role) for role in ("admin", "user")}
    for key in made.values():
        await seen(fleet.gateway, key)
    return made


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_pages_answer_without_a_key(fleet: LocalFleet) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(fleet.url + "/console", allow_redirects=False) as r:
            assert r.status == 307 and r.headers["location"].endswith("/console/")
        async with http.get(fleet.url + "/console/") as r:
            assert r.status == 200 and "<title>Corral console</title>" in await r.text()
        for name, kind in (("app.js", "javascript"), ("charts.js", "javascript"), ("style.css", "text/css")):
            async with http.get(f"{fleet.url}/console/{name}") as r:
                assert r.status == 200 and kind in r.headers["content-type"], name
        for escape in ("/console/../api/status", "/console/%2e%2e/api/status"):  # no way out of the folder
            async with http.get(URL(fleet.url + escape, encoded=True)) as r:
                assert r.status == 404, escape
        async with http.get(fleet.url + "/api/status") as r:  # the data still needs a key
            assert r.status == 401


async def test_whoami_tells_the_page_its_role(fleet: LocalFleet, keys: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http:
        for role, key in keys.items():
            async with http.get(fleet.url + "/api/corral/whoami", headers=auth(key)) as r:
                assert r.status == 200
                assert await r.json() == {"auth": "keys", "name": f"console-{role}", "role": role}


async def test_a_user_key_may_not_drain_or_unload(fleet: LocalFleet, keys: dict[str, str]) -> None:
    agent = fleet.agents[0].id
    async with aiohttp.ClientSession(headers=auth(keys["user"])) as http:
        for action in ("drain", "cordon", "uncordon"):
            async with http.post(f"{fleet.url}/api/corral/agents/{agent}/{action}") as r:
                assert r.status == 403, action
                assert "may not call" in (await r.json())["error"]
        async with http.post(fleet.url + "/api/corral/unload", json={"model": MODEL}) as r:
            assert r.status == 403
    assert fleet.gateway is not None
    assert fleet.gateway.fleet.get(agent).status == "active"  # type: ignore[union-attr]


async def test_an_admin_drains_cordons_and_uncordons_an_agent(
    fleet: LocalFleet, keys: dict[str, str]
) -> None:
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    agent = fleet.agents[1].id
    async with aiohttp.ClientSession(headers=auth(keys["admin"])) as http:
        for action, status in (("drain", "draining"), ("uncordon", "active"), ("cordon", "cordoned")):
            async with http.post(f"{fleet.url}/api/corral/agents/{agent}/{action}") as r:
                assert r.status == 200 and await r.json() == {"agent": agent, "status": status}
            await until(fleet, lambda s=status: view.get(agent).status == s)  # type: ignore[union-attr,misc]
        async with http.post(f"{fleet.url}/api/corral/agents/{agent}/uncordon") as r:
            assert r.status == 200
        await until(fleet, lambda: view.get(agent).status == "active")  # type: ignore[union-attr]
        async with http.post(f"{fleet.url}/api/corral/agents/nobody/drain") as r:
            assert r.status == 404 and "no agent 'nobody'" in (await r.json())["error"]
        async with http.post(f"{fleet.url}/api/corral/agents/{agent}/reboot") as r:
            assert r.status == 404 and "unknown action" in (await r.json())["error"]


async def test_an_admin_unloads_a_model_from_every_agent(fleet: LocalFleet, keys: dict[str, str]) -> None:
    await preload(fleet, MODEL)
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    key = parse_name(MODEL).key
    holders = sorted(a.id for a in view.loaded_on(key))
    assert len(holders) == 2
    async with aiohttp.ClientSession(headers=auth(keys["admin"])) as http:
        async with http.post(fleet.url + "/api/corral/unload", json={"model": MODEL}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["model"] == "llama3.2:latest" and sorted(body["unloaded"]) == holders
        assert body["failed"] == {}
        await until(fleet, lambda: not view.loaded_on(key))
        async with http.post(fleet.url + "/api/corral/unload", json={"model": MODEL}) as r:
            assert r.status == 404 and "not loaded" in (await r.json())["error"]
        async with http.post(fleet.url + "/api/corral/unload", json={"name": MODEL}) as r:
            assert r.status == 400


async def corral_top(*args: str) -> tuple[int, str, str]:
    return await corral("top", "--once", *args)


async def test_corral_top_shows_the_fleet_to_any_key(
    fleet: LocalFleet, keys: dict[str, str], tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(keys["user"] + "\n")
    rc, out, err = await corral_top("--url", fleet.url, "--key-file", str(key_file))
    assert rc == 0, err
    assert "2 agents (2 active)  2 GPUs" in out and "\x1b[" not in out  # one plain frame
    for a in fleet.agents:
        assert any(line.startswith(a.id + " ") for line in out.splitlines()), a.id
    rc, out, err = await corral_top("--url", fleet.url)
    assert rc == 1 and out == ""
    assert "the gateway answered 401" in err and "--key" in err
