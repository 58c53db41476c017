"""Model aliases and fallbacks against a real fleet with two gateways on one NATS: the rules are set
with the `corral alias` and `corral fallback` commands, and both gateways apply them, name the
served model in the reply and its X-Corral-Model header, and count each substitution. The first
gateway has the quantisation fallback on, the second has it off (the default)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.runtime.natsserver import NatsServer
from corral.runtime.policy import Policy
from corral.runtime.process import AsgiServer
from corral.up import FleetOptions, LocalFleet, default_sims
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.cli_helpers import corral, corral_ok
from tests.integration.waits import views_hold

pytestmark = pytest.mark.integration

LLAMA = "llama3.2:latest"
Q4 = "llama3.1:8b-instruct-q4_K_M"
MODELS = [
    {"name": LLAMA, "size_gb": 2.0, "parameter_size": "3.2B"},
    {"name": "llama3.2:1b", "size_gb": 1.3, "parameter_size": "1.2B"},
    {"name": Q4, "size_gb": 4.9, "parameter_size": "8.0B"},
]


@dataclass
class Pair:
    fleet: LocalFleet
    gateways: tuple[Gateway, Gateway]
    urls: tuple[str, str]
    nats_url: str
    root: str

    async def cli(self, *args: str) -> str:
        """Run ``corral ARGS`` as a person would; its standard output (it must succeed)."""
        return await corral_ok(*args, "--nats", self.nats_url, "--root", self.root)

    async def applied(self, predicate: Callable[[Policy], bool], timeout: float) -> None:
        """Wait until both gateways hold rules that satisfy ``predicate``, within ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        for gw in self.gateways:
            await gw.policy.wait_for(predicate, max(0.0, deadline - time.monotonic()))


@pytest.fixture
async def pair(nats_server: NatsServer, root: str) -> AsyncIterator[Pair]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, time_scale=0, models=MODELS),  # no delays, and models stay loaded
        gateway={"quant_fallback": True},
        agent={"heartbeat_s": 0.5},
    )
    async with LocalFleet(options) as fleet:
        assert fleet.gateway is not None
        second = Gateway(GatewaySettings(nats_url=nats_server.url, root=root, port=0))
        http = AsgiServer(second, "127.0.0.1", 0)
        await http.start()
        try:
            pair = Pair(fleet, (fleet.gateway, second), (fleet.url, http.url), nats_server.url, root)
            await views_hold(
                (gw.fleet for gw in pair.gateways),
                lambda view: len(view.agents()) >= 2 and bool(view.with_model(LLAMA)),
                timeout=10.0,
                what="both gateways see the whole fleet",
            )
            yield pair
        finally:
            await http.stop()


async def chat(url: str, model: str) -> tuple[int, dict[str, Any], str]:
    """A native /api/chat: its status, body and X-Corral-Model header."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/chat", json=body) as r:
        return r.status, json.loads(await r.read()), r.headers.get("x-corral-model", "")


async def substitutions(url: str) -> dict[tuple[str, str, str], float]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "corral_gateway_model_substitutions_total":
                labels = sample.labels
                out[(labels["requested"], labels["served"], labels["kind"])] = sample.value
    return out


async def test_an_alias_serves_openai_clients_on_every_gateway_until_it_is_removed(pair: Pair) -> None:
    out = await pair.cli("alias", "gpt-4o-mini", "llama3.2")
    assert "gpt-4o-mini:latest" in out and LLAMA in out
    await pair.applied(lambda p: "gpt-4o-mini:latest" in p.aliases, timeout=1.0)
    assert json.loads(await pair.cli("alias", "--json")) == {"gpt-4o-mini:latest": LLAMA}

    for url in pair.urls:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30.0)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        completion = raw.parse()
        assert raw.headers["x-corral-model"] == LLAMA
        assert completion.model == LLAMA  # the reply names the model that served it
        assert completion.choices[0].message.content
        ids = [m.id async for m in client.models.list()]
        assert "gpt-4o-mini:latest" in ids and LLAMA in ids
        # every id listed can be retrieved, as OpenAI's API promises (clients check ids so)
        alias = await client.models.retrieve("gpt-4o-mini:latest")
        assert (alias.id, alias.owned_by) == ("gpt-4o-mini:latest", "corral")
        assert (await substitutions(url))[("gpt-4o-mini:latest", LLAMA, "alias")] == 1.0
        await client.close()

    # `ollama run ALIAS` shows the model before it runs it, and pulls it on a 404
    async with ollama.AsyncClient(host=pair.urls[0]) as c:
        shown, target = await c.show("gpt-4o-mini"), await c.show(LLAMA)
    assert shown.details == target.details and shown.modelfile == target.modelfile

    await pair.cli("alias", "--rm", "gpt-4o-mini")
    await pair.applied(lambda p: not p.aliases, timeout=1.0)  # on every gateway within a second
    for url in pair.urls:
        status, body, _ = await chat(url, "gpt-4o-mini")
        assert status == 404, body


async def test_a_fallback_serves_an_absent_model_and_never_a_present_one(pair: Pair) -> None:
    status, _, _ = await chat(pair.urls[0], "absent-model")
    assert status == 404
    await pair.cli("fallback", "absent-model", "--to", "llama3.2")
    await pair.cli("fallback", "llama3.2:1b", "--to", "llama3.2")
    await pair.applied(lambda p: len(p.fallbacks) == 2, timeout=1.0)
    assert json.loads(await pair.cli("fallback", "--json")) == {
        "absent-model:latest": [LLAMA],
        "llama3.2:1b": [LLAMA],
    }
    for url in pair.urls:
        status, body, served = await chat(url, "absent-model")
        assert (status, served, body["model"]) == (200, LLAMA, LLAMA), body
        status, body, served = await chat(url, "llama3.2:1b")  # it can start: never substituted
        assert (status, served, body["model"]) == (200, "llama3.2:1b", "llama3.2:1b"), body
        counted = await substitutions(url)
        assert counted == {("absent-model:latest", LLAMA, "fallback"): 1.0}

    await pair.cli("fallback", "--rm", "absent-model")
    await pair.applied(lambda p: list(p.fallbacks) == ["llama3.2:1b"], timeout=1.0)
    for url in pair.urls:
        status, _, _ = await chat(url, "absent-model")
        assert status == 404


async def test_the_quantisation_fallback_serves_only_where_it_is_on(pair: Pair) -> None:
    status, _, served = await chat(pair.urls[0], Q4)  # loads it
    assert (status, served) == (200, Q4)
    q4 = Q4.lower()
    await views_hold([pair.gateways[0].fleet], lambda view: bool(view.loaded_on(q4)), timeout=10.0)

    want = "llama3.1:8b-instruct-q8_0"
    status, body, served = await chat(pair.urls[0], want)
    assert (status, served, body["model"]) == (200, Q4, Q4), body
    assert (await substitutions(pair.urls[0]))[("other", q4, "quant")] == 1.0
    status, body, _ = await chat(pair.urls[1], want)  # off by default
    assert status == 404, body
    status, _, _ = await chat(pair.urls[0], "llama3.1:70b-instruct-q8_0")  # another size: nothing
    assert status == 404


async def test_a_rule_naming_models_the_fleet_lacks_or_has_is_stored_with_a_note(pair: Pair) -> None:
    """Rules are stored whatever the fleet holds now (models come and go), but a rule that will not
    do what it says yet, or hides a model, says so on stderr."""
    args = ("--nats", pair.nats_url, "--root", pair.root)
    rc, _, err = await corral("fallback", "llama3.2", "--to", "absent-model,llama3.2:1b", *args)
    assert rc == 0 and "note: no agent has absent-model now" in err and "1b" not in err, err
    rc, _, err = await corral("alias", "my-model", "absent-model", *args)
    assert rc == 0 and "note: no agent has absent-model now" in err, err
    rc, _, err = await corral("alias", "gpt-4o", "llama3.2", *args)
    assert rc == 0 and err == "", err  # a plain alias to a model the fleet has: nothing to say
    rc, _, err = await corral("alias", "llama3.2:1b", "llama3.2:latest", *args)
    assert rc == 0 and "note: agents have a model named llama3.2:1b" in err, err
    aliases = json.loads(await pair.cli("alias", "--json"))
    assert aliases == {"my-model:latest": "absent-model:latest", "gpt-4o:latest": LLAMA, "llama3.2:1b": LLAMA}
    assert json.loads(await pair.cli("fallback", "--json")) == {LLAMA: ["absent-model:latest", "llama3.2:1b"]}
