"""Auto-pull (off by default): a request for a model no agent has pulls it onto one agent first.
And pulls through the registry outlive the gateway's idle timeout (the registry pings)."""

from __future__ import annotations

import asyncio
from typing import Any

import ollama
import openai
import pytest
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims

pytestmark = pytest.mark.integration

MISSING = "llama3.2:1b"  # in every simulator's registry, on no simulator's disk


def _options(nats_server: NatsServer, root: str, *, registry: bool = True, **gateway: Any) -> FleetOptions:
    opts = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(3, time_scale=0.01),
        agent={"refresh_s": 30.0, "heartbeat_s": 1.0},
        gateway=gateway,
        registry={"replica_check_s": 0.0},
    )
    if not registry:
        opts.registry = None
    return opts


def _holders(fleet: LocalFleet, name: str) -> list[str]:
    assert fleet.gateway is not None
    return [a.id for a in fleet.gateway.fleet.with_model(parse_name(name).key)]


async def test_without_auto_pull_a_missing_model_is_ollamas_404(nats_server: NatsServer, root: str) -> None:
    async with LocalFleet(_options(nats_server, root)) as fleet:
        async with ollama.AsyncClient(host=fleet.url) as c:
            with pytest.raises(ollama.ResponseError) as e:
                await c.generate(model=MISSING, prompt="hi")
        assert e.value.status_code == 404 and e.value.error == f"model '{MISSING}' not found"
        assert _holders(fleet, MISSING) == []


@pytest.mark.parametrize("registry", [True, False], ids=["registry", "gateway-alone"])
async def test_concurrent_requests_for_a_missing_model_pull_it_once_and_are_served(
    nats_server: NatsServer, root: str, registry: bool
) -> None:
    async with LocalFleet(_options(nats_server, root, registry=registry, auto_pull=True)) as fleet:
        async with ollama.AsyncClient(host=fleet.url) as c:
            replies = await asyncio.gather(
                *(c.generate(model=MISSING, prompt=f"hi {i}", options={"num_predict": 3}) for i in range(6))
            )
        assert all(r.done and r.model == MISSING for r in replies)
        assert sum(s.stats.pulls for s in fleet.sims) == 1  # one pull, not one per request
        assert len(_holders(fleet, MISSING)) == 1
        assert sum(s.stats.finished for s in fleet.sims) == 6


async def test_auto_pull_follows_a_strict_vendor_pin_and_the_openai_api(
    nats_server: NatsServer, root: str
) -> None:
    async with LocalFleet(_options(nats_server, root, auto_pull=True)) as fleet:
        client = openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0)
        try:
            r = await client.chat.completions.create(
                model=f"amd/{MISSING}",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=3,
                extra_headers={"X-Enforce-Strategy": "true"},
            )
        finally:
            await client.close()
        assert r.choices[0].message.content
        assert fleet.gateway is not None
        (holder,) = fleet.gateway.fleet.with_model(parse_name(MISSING).key)
        assert holder.vendor == "amd"


async def test_a_model_that_cannot_be_pulled_is_still_a_404(nats_server: NatsServer, root: str) -> None:
    async with LocalFleet(_options(nats_server, root, auto_pull=True)) as fleet:
        async with ollama.AsyncClient(host=fleet.url) as c:
            for _ in range(2):  # the second is answered by the first one's failed pull, not a new one
                with pytest.raises(ollama.ResponseError) as e:
                    await c.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
                assert e.value.status_code == 404 and e.value.error == "model 'no-such-model' not found"
        assert sum(s.stats.pulls for s in fleet.sims) == 1


async def test_a_silent_pull_outlives_the_gateways_idle_timeout(nats_server: NatsServer, root: str) -> None:
    """An unstreamed pull says nothing until it ends; the registry's pings keep it alive."""
    opts = _options(nats_server, root, idle_timeout_s=0.5)
    opts.sims = default_sims(1, time_scale=0.3)  # a 1.3 GB pull at 200 MB/s: about 2 s of wall time
    opts.registry = {"replica_check_s": 0.0, "ping_interval_s": 0.1}
    async with LocalFleet(opts) as fleet:
        async with ollama.AsyncClient(host=fleet.url) as c:
            r = await c.pull(MISSING, stream=False)
        assert r.status == "success" and fleet.sims[0].stats.pulls == 1
