"""A fleet under `corral auth init`'s identities, on a real nats-server: every role does its work,
and every identity is refused what it has no business doing (the server's permissions violation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import nats.js.errors
import ollama
import openai
import pytest
from corral.auth.config import add_agent, creds_path, init
from corral.auth.permissions import agent_user, gateway_user
from corral.client import AsyncClient
from corral.gateway.app import Gateway
from corral.gateway.batch.store import BatchStore
from corral.gateway.settings import GatewaySettings
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry.liveness import Presence
from corral.runtime.buckets import ensure_buckets
from corral.runtime.nats import NatsRefused, connect, round_trip
from corral.runtime.natsauth import NatsAuth
from corral.runtime.natsserver import NatsServer, free_port
from corral.runtime.process import AsgiServer
from corral.simulator import SimServer
from corral.up import Backend, FleetOptions, LocalFleet, default_sims, sim_gpus
from nats.aio.client import Client as NATS

from tests.integration import waits
from tests.integration.cli_helpers import corral, corral_ok
from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration

ROOT = "sec"
MODEL = "llama3.2"
AGENTS = ("nvidia-0", "amd-1")
LATE = "late-2"  # an agent added after the server started: `corral auth agent` and a reload
SOLO = "solo-3"  # an agent one test starts and stops, beside its own simulated server
GATEWAYS = ("gw1", "gw2")  # gateways with a fixed --gateway-id, each its own identity


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("auth")
    init(d, ROOT, (*AGENTS, SOLO), gateways=GATEWAYS)
    return d


@pytest.fixture(scope="module")
async def server(auth_dir: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(auth_file=auth_dir / "auth.conf") as s:
        yield s


def creds(auth_dir: Path, user: str) -> dict[str, Any]:
    return {"nats_creds": str(creds_path(auth_dir, user))}


@pytest.fixture(scope="module")
async def fleet(server: NatsServer, auth_dir: Path) -> AsyncIterator[LocalFleet]:
    # the operator identity creates the buckets and the queue stream: no service may
    operator = await connect(
        server.url, name="operator", auth=NatsAuth(str(creds_path(auth_dir, "operator")))
    )
    await ensure_buckets(operator.jetstream(), Subjects(ROOT))
    # and the Batch API's stores, as its `corral status` does: no gateway may make a stream
    await BatchStore.open(operator.jetstream(), Subjects(ROOT), max_payload=operator.max_payload)
    await operator.close()
    options = FleetOptions(
        port=0,
        nats_url=server.url,
        root=ROOT,
        gateway={"queue_timeout_s": 5.0, "gateway_id": "gw1"} | creds(auth_dir, gateway_user("gw1")),
        # a reload resets every connection's allowance to answer requests it already received
        # (nats-server's response permissions): a background probe in flight at that instant would
        # have its answer refused. The probes' own test sends one round itself.
        registry={"probe_s": 3600.0} | creds(auth_dir, "registry"),
        aggregator=creds(auth_dir, "aggregator"),
    )
    async with LocalFleet(options) as f:
        for agent_id, cfg in zip(AGENTS, default_sims(len(AGENTS), time_scale=0.01), strict=True):
            sim = SimServer(cfg, host="127.0.0.1", port=0)
            await sim.start()
            f.sims.append(sim)
            f.options.agent = {"refresh_s": 0.5, "heartbeat_s": 1.0} | creds(auth_dir, agent_user(agent_id))
            await f.add_agent(
                Backend(sim.url, cfg.vendor, cfg.num_parallel, gpus=sim_gpus(cfg)), agent_id=agent_id
            )
        await preload(f, MODEL)
        yield f


def services(fleet: LocalFleet) -> dict[str, Any]:
    assert fleet.gateway is not None and fleet.registry is not None and fleet.aggregator is not None
    out = {"gateway": fleet.gateway.nc, "registry": fleet.registry.nc, "aggregator": fleet.aggregator.nc}
    return out | {a.id: a.nc for a in fleet.agents}


def assert_no_violation(fleet: LocalFleet) -> None:
    """nats-py keeps the server's last error: a permissions violation would be one."""
    errors = {name: nc.last_error for name, nc in services(fleet).items() if nc.last_error is not None}
    assert errors == {}


class Denials:
    """A connection as one identity, and the permission errors the server sends it."""

    def __init__(self) -> None:
        self.errors: asyncio.Queue[Exception] = asyncio.Queue()
        self.nc: Any = None

    async def open(self, url: str, creds_file: Path) -> Denials:
        async def on_error(e: Exception) -> None:
            await self.errors.put(e)

        self.nc = await nats.connect(
            url, error_cb=on_error, allow_reconnect=False, **NatsAuth(str(creds_file)).options()
        )
        return self

    async def denied(self, what: str) -> str:
        error = await asyncio.wait_for(self.errors.get(), 5.0)
        text = str(error).lower()
        assert "permissions violation" in text and what.lower() in text, text
        return text


@pytest.fixture
async def as_user(server: NatsServer, auth_dir: Path) -> AsyncIterator[Any]:
    opened: list[Denials] = []

    async def open_as(user: str) -> Denials:
        d = await Denials().open(server.url, creds_path(auth_dir, user))
        opened.append(d)
        return d

    yield open_as
    for d in opened:
        await d.nc.close()


# -- every role works -------------------------------------------------------------------------


async def test_generate_tags_and_pull_through_the_gateway(fleet: LocalFleet) -> None:
    async with ollama.AsyncClient(host=fleet.url) as c:
        r = await c.generate(model=MODEL, prompt="hello", options={"num_predict": 3})
        assert r.done and r.response
        chunks = [p async for p in await c.generate(model=MODEL, prompt="hi", stream=True)]
        assert chunks[-1].done
        tags = await c.list()
        assert MODEL + ":latest" in {m.model for m in tags.models}
        pulled = await c.pull("deepseek-r1:7b")
        assert pulled.status == "success"
    assert_no_violation(fleet)


async def test_a_gateway_under_its_identity_says_it_is_ready(fleet: LocalFleet) -> None:
    """``/ready`` asks JetStream what the gateway's identity may ask: a readiness probe (Kubernetes,
    a load balancer) keeps it in rotation. It asked for the account's info, the operator's alone."""
    async with aiohttp.ClientSession() as s, s.get(fleet.url + "/ready") as r:
        assert r.status == 200, await r.text()
    assert_no_violation(fleet)


async def test_the_operator_drains_and_uncordons_an_agent(fleet: LocalFleet, auth_dir: Path) -> None:
    assert fleet.gateway is not None
    agent = fleet.agents[0]
    operator = str(creds_path(auth_dir, "operator"))
    flags = ["--nats-url", fleet.nats_url, "--root", ROOT, "--nats-creds", operator]
    view = fleet.gateway.fleet
    for kind, status in (("drain", "draining"), ("uncordon", "active")):
        await corral_ok(kind, agent.id, *flags, timeout=30)
        assert agent.status == status
        await until(fleet, lambda s=status: (a := view.get(agent.id)) is not None and a.status == s)
    assert_no_violation(fleet)


async def test_an_agent_added_later_joins_after_a_reload(
    fleet: LocalFleet, server: NatsServer, auth_dir: Path
) -> None:
    add_agent(auth_dir, LATE)
    await server.reloaded()
    assert fleet.gateway is not None
    sim = SimServer(default_sims(1, time_scale=0.01)[0], host="127.0.0.1", port=0)
    await sim.start()
    fleet.sims.append(sim)
    fleet.options.agent = {"refresh_s": 0.5, "heartbeat_s": 1.0} | creds(auth_dir, agent_user(LATE))
    cfg = sim.config
    await fleet.add_agent(Backend(sim.url, cfg.vendor, cfg.num_parallel, gpus=sim_gpus(cfg)), agent_id=LATE)
    await until(fleet, lambda: fleet.gateway is not None and fleet.gateway.fleet.get(LATE) is not None)
    assert_no_violation(fleet)


# -- every identity is refused what is not its own ----------------------------------------------


async def test_an_anonymous_client_cannot_connect(server: NatsServer) -> None:
    nc = NATS()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
    finally:
        await nc.close()


async def test_an_agent_cannot_publish_work(fleet: LocalFleet, as_user: Any) -> None:
    s = Subjects(ROOT)
    agent = await as_user(agent_user(AGENTS[0]))
    for subject in (s.work("any", "x"), s.agent_work(AGENTS[1]), s.queue("any", "x")):
        await agent.nc.publish(subject, b"{}")
        assert await round_trip(agent.nc, 10.0)
        await agent.denied(f'Publish to "{subject}"')


async def test_an_agent_cannot_read_replies_or_anothers_work(fleet: LocalFleet, as_user: Any) -> None:
    s = Subjects(ROOT)
    agent = await as_user(agent_user(AGENTS[0]))
    for subject in (s.replies_all, s.reply("gw1", "r1"), s.agent_work(AGENTS[1]), "_INBOX_gateway.>", ">"):
        await agent.nc.subscribe(subject)
        assert await round_trip(agent.nc, 10.0)
        await agent.denied(f'Subscription to "{subject}"')


async def test_an_agent_writes_its_own_state_and_no_one_elses(fleet: LocalFleet, as_user: Any) -> None:
    s = Subjects(ROOT)
    agent = await as_user(agent_user(AGENTS[0]))
    kv = await agent.nc.jetstream(timeout=1.0).key_value(s.agents_bucket)
    other = await kv.get(AGENTS[1])
    with pytest.raises(nats.errors.TimeoutError):  # the put is dropped: no acknowledgement comes
        await kv.put(AGENTS[1], b"{}")
    await agent.denied(f'Publish to "$KV.{s.agents_bucket}.{AGENTS[1]}"')
    with pytest.raises(nats.errors.TimeoutError):
        await kv.delete(AGENTS[1])
    await agent.denied("Publish to")
    assert (await kv.get(AGENTS[1])).revision >= other.revision  # untouched, still its own
    assert (await kv.get(AGENTS[1])).value != b"{}"


async def test_an_agent_cannot_drain_agents_or_create_streams(fleet: LocalFleet, as_user: Any) -> None:
    s = Subjects(ROOT)
    agent = await as_user(agent_user(AGENTS[0]))
    await agent.nc.publish(s.agent_admin(AGENTS[1]), b"", headers={H.CTL: H.DRAIN})
    assert await round_trip(agent.nc, 10.0)
    await agent.denied("Publish to")
    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.jetstream(timeout=1.0).delete_stream(s.queue_stream)
    await agent.denied("$JS.API.STREAM.DELETE")


async def test_a_consumer_cannot_deliver_a_drain_its_creator_may_not_publish(
    fleet: LocalFleet, as_user: Any, auth_dir: Path
) -> None:
    """nats-server lets a push consumer deliver to any subject, whatever its creator may publish
    (nats-io/nats-server#8274): an agent writes its own state key with a drain header and has a
    consumer deliver that entry to another agent's admin subject. Agents drop what a JetStream
    consumer delivers on their core subscriptions, so only a peer's publish drains them."""
    s = Subjects(ROOT)
    attacker = (await as_user(agent_user(AGENTS[0]))).nc
    victim = next(a for a in fleet.agents if a.id == AGENTS[1])
    key, stream = s.kv_key(s.agents_bucket, AGENTS[0]), s.kv_stream(s.agents_bucket)
    mine = await (await attacker.jetstream().key_value(s.agents_bucket)).get(AGENTS[0])
    written = await attacker.request(key, mine.value, headers={H.CTL: H.DRAIN}, timeout=5)
    seq = json.loads(written.data)["seq"]
    config = {
        "deliver_subject": s.agent_admin(AGENTS[1]),
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": seq,
        "ack_policy": "none",
        "filter_subject": key,
    }
    made = await attacker.request(
        f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps({"stream_name": stream, "config": config}).encode()
    )
    name = json.loads(made.data)["name"]  # the server took it: the hole is nats-server's

    async def delivered() -> bool:
        info = await attacker.request(f"$JS.API.CONSUMER.INFO.{stream}.{name}", b"", timeout=5)
        return json.loads(info.data)["delivered"]["stream_seq"] >= seq

    await waits.until(delivered, lambda t: round_trip(attacker, max(t, 0.01)), timeout=10.0)
    await attacker.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=5)
    # the operator's own request on the same subject: answered once the agent has read what came before
    operator = await connect(fleet.nats_url, name="op", auth=NatsAuth(str(creds_path(auth_dir, "operator"))))
    try:
        await operator.request(s.agent_admin(AGENTS[1]), b"", headers={H.CTL: "nothing"}, timeout=5)
    finally:
        await operator.close()
    assert victim.status == "active"


async def test_a_consumer_delivery_on_a_claim_subject_takes_no_claim_away(
    fleet: LocalFleet, as_user: Any
) -> None:
    """A claim subscription takes one delivery: a consumer's delivery there (see above) is dropped,
    and the claim it used up is armed again, or each such delivery would take a slot's claim away."""
    s = Subjects(ROOT)
    attacker = (await as_user(agent_user(AGENTS[0]))).nc
    claim = s.work("any", parse_name(MODEL).token)

    def armed() -> set[int]:
        return {sub._id for a in fleet.agents for sub in a._claims._armed.get(claim, [])}

    await waits.until(lambda: bool(armed()), lambda t: round_trip(attacker, max(t, 0.01)), timeout=10.0)
    before = armed()
    key, stream = s.kv_key(s.agents_bucket, AGENTS[0]), s.kv_stream(s.agents_bucket)
    mine = await (await attacker.jetstream().key_value(s.agents_bucket)).get(AGENTS[0])
    seq = json.loads((await attacker.request(key, mine.value, timeout=5)).data)["seq"]
    config = {"deliver_subject": claim, "deliver_group": claim, "deliver_policy": "by_start_sequence",
              "opt_start_seq": seq, "ack_policy": "none", "filter_subject": key}  # fmt: skip
    made = await attacker.request(
        f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps({"stream_name": stream, "config": config}).encode()
    )
    name = json.loads(made.data)["name"]
    try:
        # one claim subscription took it: retired, and another armed in its place
        await waits.until(
            lambda: len(armed()) == len(before) and armed() != before,
            lambda t: round_trip(attacker, max(t, 0.01)),
            timeout=10.0,
        )
    finally:
        await attacker.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=5)


async def test_a_gateway_cannot_give_a_batch_stream_other_subjects(fleet: LocalFleet, as_user: Any) -> None:
    """A stream's subjects are what it captures: a gateway that could change the Batch API's line
    stream could have it keep other gateways' replies (or every request) for it to read."""
    s = Subjects(ROOT)
    gateway = await as_user(gateway_user("gw1"))
    js = gateway.nc.jetstream(timeout=1.0)
    config = (await js.stream_info(s.batch_lines_stream)).config
    config.subjects = [s.batch_lines_all, s.reply_all("gw2")]
    with pytest.raises(nats.errors.TimeoutError):
        await js.update_stream(config)
    await gateway.denied("$JS.API.STREAM.UPDATE")
    assert (await js.stream_info(s.batch_lines_stream)).config.subjects == [s.batch_lines_all]


async def test_a_command_denied_by_nats_says_so(fleet: LocalFleet, auth_dir: Path) -> None:
    """A call the server denies goes unanswered: the command names the denial, not a NATS that
    did not answer."""
    agent = str(creds_path(auth_dir, agent_user(AGENTS[0])))
    rc, _, err = await corral(
        "keys", "create", "mallory", "--role", "admin", "--nats", fleet.nats_url, "--root", ROOT,
        "--nats-creds", agent, timeout=60,
    )  # fmt: skip
    assert rc == 1 and "denied this identity" in err and "permissions violation" in err, err


async def test_a_service_or_command_before_the_setup_step_says_what_to_run(tmp_path: Path) -> None:
    """Before the operator made the fleet's buckets and queue stream, a gateway under its identity
    may not make them: NATS denies the create and answers nothing, so waiting on would only end in
    a timeout. It stops at once with a line saying what to run, and so does `corral status` run
    by that identity."""
    init(tmp_path, "fresh", ("a1",), gateways=("g1",))
    async with NatsServer(auth_file=tmp_path / "auth.conf") as server:
        g1 = creds(tmp_path, gateway_user("g1"))
        early = Gateway(GatewaySettings(nats_url=server.url, root="fresh", port=0, gateway_id="g1", **g1))
        try:
            async with asyncio.timeout(30):  # within the first denial's answer, not the minute's patience
                with pytest.raises(
                    NatsRefused, match="run `corral status` .* with the operator's credentials"
                ):
                    await early.start()
        finally:
            await early.stop()
        rc, _, err = await corral(
            "status", "--nats", server.url, "--root", "fresh", "--nats-creds", g1["nats_creds"], timeout=30
        )
        assert rc == 1 and "only the operator may make them" in err and "Traceback" not in err, err


async def test_the_operators_setup_step_makes_the_batch_stores(tmp_path: Path) -> None:
    """No gateway may make a stream, so the operator's `corral status` makes the Batch API's too;
    an upload before it is told so (503), not left to time out into a 500."""
    init(tmp_path, "bs", ("a1",), gateways=("g1",))
    async with NatsServer(auth_file=tmp_path / "auth.conf") as server:
        operator = str(creds_path(tmp_path, "operator"))
        nc = await connect(server.url, name="operator", auth=NatsAuth(operator))
        try:
            await ensure_buckets(nc.jetstream(), Subjects("bs"))  # the fleet's, not the Batch API's
            settings = GatewaySettings(
                nats_url=server.url, root="bs", port=0, gateway_id="g1", **creds(tmp_path, gateway_user("g1"))
            )
            gateway = Gateway(settings)
            http = AsgiServer(gateway, "127.0.0.1", 0)
            try:
                await gateway.start()
                await http.start()
                async with openai.AsyncOpenAI(base_url=http.url + "/v1", api_key="x", max_retries=0) as c:
                    with pytest.raises(openai.APIStatusError) as early:
                        await c.files.create(file=("early.jsonl", b"{}"), purpose="batch")
                    assert early.value.status_code == 503 and "corral status" in str(early.value)
                    await corral_ok(
                        "status", "--nats", server.url, "--root", "bs", "--nats-creds", operator, timeout=30
                    )
                    opened = await BatchStore.open(
                        nc.jetstream(), Subjects("bs"), max_payload=nc.max_payload, create=False
                    )
                    assert opened is not None  # `Missing` before
                    made = await c.files.create(file=("later.jsonl", b"{}"), purpose="batch")
                    assert made.id
            finally:
                await http.stop()
                await gateway.stop()
        finally:
            await nc.close()


async def test_a_gateway_cannot_write_agent_state_or_drain_agents(fleet: LocalFleet, as_user: Any) -> None:
    s = Subjects(ROOT)
    gateway = await as_user("gateway")
    kv = await gateway.nc.jetstream(timeout=1.0).key_value(s.agents_bucket)
    with pytest.raises(nats.errors.TimeoutError):
        await kv.put(AGENTS[0], b"{}")
    await gateway.denied(f'Publish to "$KV.{s.agents_bucket}.{AGENTS[0]}"')
    for kind in (H.DRAIN, H.CORDON):
        await gateway.nc.publish(s.agent_admin(AGENTS[0]), b"", headers={H.CTL: kind})
        assert await round_trip(gateway.nc, 10.0)
        await gateway.denied(f'Publish to "{s.agent_admin(AGENTS[0])}"')
    assert all(a.status == "active" for a in fleet.agents)


async def test_the_aggregator_cannot_send_work_or_hear_requests(fleet: LocalFleet, as_user: Any) -> None:
    s = Subjects(ROOT)
    aggregator = await as_user("aggregator")
    await aggregator.nc.publish(s.work("any", "x"), b"{}")
    assert await round_trip(aggregator.nc, 10.0)
    await aggregator.denied("Publish to")
    await aggregator.nc.subscribe(s.work_all)
    assert await round_trip(aggregator.nc, 10.0)
    await aggregator.denied("Subscription to")


async def test_the_registry_cannot_drain_agents_touch_keys_or_hear_claims(
    fleet: LocalFleet, as_user: Any
) -> None:
    s = Subjects(ROOT)
    registry = await as_user("registry")
    for subject in (s.agent_admin(AGENTS[0]), s.kv_key(s.keys_bucket, "k1"), s.work("any", "x")):
        await registry.nc.publish(subject, b"")
        assert await round_trip(registry.nc, 10.0)
        await registry.denied(f'Publish to "{subject}"')
    await registry.nc.subscribe(s.work_all)
    assert await round_trip(registry.nc, 10.0)
    await registry.denied("Subscription to")


async def test_the_registry_reads_its_own_replies_and_no_gateways(fleet: LocalFleet, as_user: Any) -> None:
    """Its requests (pulls, preloads) name it ``registry.<copy>`` in their reply subjects: the
    registry identity reads those, never a gateway's answers (a chat's text) or large bodies."""
    s = Subjects(ROOT)
    assert fleet.registry is not None and fleet.registry._transport is not None
    assert fleet.registry._transport.id.startswith("registry.")  # the fleet's pulls run on it (above)
    registry = await as_user("registry")
    for subject in (s.reply_all("gw1"), s.body_all("gw1"), s.replies_all, s.bodies_all, s.reply_all("other")):
        await registry.nc.subscribe(subject)
        assert await round_trip(registry.nc, 10.0)
        await registry.denied(f'Subscription to "{subject}"')
    await registry.nc.subscribe(s.registry_replies)  # its own: allowed
    assert await round_trip(registry.nc, 10.0)
    assert registry.errors.empty()
    assert_no_violation(fleet)


# -- deploy/nats.conf and password identities ----------------------------------------------------


async def test_deploy_nats_conf_with_the_include_only_lets_identities_in(tmp_path: Path) -> None:
    """deploy/nats.conf's opt-in line, uncommented, beside a `corral auth init --passwords` dir."""
    from tests.integration.test_deploy_nats import nats_conf_copy

    init(tmp_path / "auth", "pw", ["a1"], passwords=True)
    port = free_port()
    conf = nats_conf_copy(tmp_path, port=str(port), http_port=str(free_port()))
    text = conf.read_text()
    assert text.count('# include "auth/auth.conf"') == 1
    conf.write_text(text.replace('# include "auth/auth.conf"', 'include "auth/auth.conf"'))
    async with NatsServer(port=port, config_file=conf) as server:
        nc = await connect(
            server.url, name="op", auth=NatsAuth(str(creds_path(tmp_path / "auth", "operator")))
        )
        try:
            await ensure_buckets(nc.jetstream(), Subjects("pw"))
        finally:
            await nc.close()
        anonymous = NATS()
        try:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await anonymous.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
        finally:
            await anonymous.close()


async def test_a_gateway_with_its_own_identity_reads_only_its_own_replies(
    fleet: LocalFleet, as_user: Any
) -> None:
    """The fleet's gateway runs as ``gateway-gw1`` with ``--gateway-id gw1`` (and serves: the tests
    above); ``gateway-gw2`` may not listen to gw1's replies or large bodies."""
    s = Subjects(ROOT)
    assert fleet.gateway is not None and fleet.gateway.planner.transport.id == "gw1"
    other = await as_user(gateway_user("gw2"))
    for subject in (s.reply_all("gw1"), s.body_all("gw1"), s.replies_all):
        await other.nc.subscribe(subject)
        await other.denied(f'Subscription to "{subject}"')
    assert_no_violation(fleet)


async def refuses_anonymous(url: str) -> None:
    """A request without a key to the gateway at ``url`` is refused: 401."""
    async with ollama.AsyncClient(host=url) as anonymous:
        with pytest.raises(ollama.ResponseError) as refused:
            await anonymous.generate(model=MODEL, prompt="hi")
    assert refused.value.status_code == 401


async def test_api_keys_work_under_a_gateways_identity(fleet: LocalFleet, auth_dir: Path) -> None:
    """A gateway with keys on (CORRAL_AUTH=keys) reads the keys and counts usage and limits under its
    own NATS identity; the operator makes the key with `corral keys create`."""
    operator = str(creds_path(auth_dir, "operator"))
    out = await corral_ok(
        "keys", "create", "k1", "--rpm", "100", "--nats", fleet.nats_url, "--root", ROOT, "--nats-creds", operator,
        timeout=30,
    )  # fmt: skip
    key = out.strip()
    settings = GatewaySettings(
        nats_url=fleet.nats_url, root=ROOT, port=0, auth="keys", gateway_id="gw2",
        **creds(auth_dir, gateway_user("gw2")),
    )  # fmt: skip
    second = Gateway(settings)
    http = AsgiServer(second, "127.0.0.1", 0)
    await second.start()
    await http.start()
    try:
        await until(fleet, lambda: len(second.fleet.agents()) >= len(AGENTS))
        async with ollama.AsyncClient(host=http.url, headers={"Authorization": f"Bearer {key}"}) as client:
            r = await client.generate(model=MODEL, prompt="hi", options={"num_predict": 2})
            assert r.done
        await refuses_anonymous(http.url)
        assert second.nc is not None and second.nc.last_error is None
    finally:
        await http.stop()
        await second.stop()


async def test_a_console_drain_the_gateways_identity_may_not_send_is_refused_naming_why(
    fleet: LocalFleet, auth_dir: Path
) -> None:
    """Only the operator may drain or cordon agents: NATS denies a gateway's console action, which
    answers 403 naming the denial and the command to use, not an agent that did not answer. (A
    gateway of its own: the denial stays on its connection, not on the fleet's.)"""
    settings = GatewaySettings(
        nats_url=fleet.nats_url, root=ROOT, port=0, gateway_id="gw2", **creds(auth_dir, gateway_user("gw2"))
    )
    gateway = Gateway(settings)
    http = AsgiServer(gateway, "127.0.0.1", 0)
    await gateway.start()
    await http.start()
    agent = fleet.agents[0].id
    try:
        await until(fleet, lambda: gateway.fleet.get(agent) is not None)
        async with aiohttp.ClientSession() as s, s.post(f"{http.url}/api/corral/agents/{agent}/drain") as r:
            assert r.status == 403, await r.text()
            error = (await r.json())["error"]
        assert error.startswith("this gateway's NATS identity may not drain agents (") and "iolation" in error
        assert error.endswith(f"use `corral drain {agent}` with the operator's identity"), error
        assert fleet.agents[0].status == "active"
    finally:
        await http.stop()
        await gateway.stop()


async def test_keys_on_before_any_key_the_setup_step_makes_their_buckets(
    fleet: LocalFleet, auth_dir: Path
) -> None:
    """Keys on (CORRAL_AUTH=keys) before the operator made the first key: the gateway may not make
    the key buckets (a gateway that could make the keys' stream could make it copy keys in from a
    stream it writes), so it stops with a line saying what to run; `corral status` as the operator,
    the setup step, makes them, and the gateway then starts and refuses requests without a key."""
    operator = str(creds_path(auth_dir, "operator"))
    admin = await connect(fleet.nats_url, name="operator", auth=NatsAuth(operator))
    s = Subjects(ROOT)
    for bucket in (s.keys_bucket, s.usage_bucket, s.limits_bucket):
        with contextlib.suppress(nats.js.errors.NotFoundError):  # another test of this file made them
            await admin.jetstream().delete_key_value(bucket)
    await admin.close()
    settings = GatewaySettings(
        nats_url=fleet.nats_url, root=ROOT, port=0, auth="keys", gateway_id="gw2",
        **creds(auth_dir, gateway_user("gw2")),
    )  # fmt: skip
    early = Gateway(settings)
    try:
        with pytest.raises(NatsRefused, match="only the operator may make them: run `corral status`"):
            await early.start()
    finally:
        await early.stop()
    # run by another identity, the setup step says what it could not make, and still shows the fleet
    gateway_creds = str(creds_path(auth_dir, gateway_user("gw2")))
    rc, out, err = await corral(
        "status", "--nats", fleet.nats_url, "--root", ROOT, "--nats-creds", gateway_creds
    )
    assert rc == 0 and "agents" in out and "with NATS identities only the operator's may make them" in err, (
        err
    )
    await corral_ok("status", "--nats", fleet.nats_url, "--root", ROOT, "--nats-creds", operator, timeout=30)
    gateway = Gateway(settings)
    http = AsgiServer(gateway, "127.0.0.1", 0)
    try:
        await gateway.start()
        await http.start()
        await refuses_anonymous(http.url)
        assert gateway.nc is not None and gateway.nc.last_error is None
    finally:
        await http.stop()
        await gateway.stop()


async def test_the_python_client_speaks_nats_under_an_identity(fleet: LocalFleet, auth_dir: Path) -> None:
    operator = str(creds_path(auth_dir, "operator"))
    async with AsyncClient(fleet.nats_url, root=ROOT, nats_creds=operator) as client:
        r = await client.generate(MODEL, "hi", options={"num_predict": 2})
        assert r["done"] is True
    with pytest.raises(NatsRefused, match="Authorization Violation"):  # no identity: refused at once
        async with AsyncClient(fleet.nats_url, root=ROOT) as anonymous:
            await anonymous.generate(MODEL, "hi")


async def test_an_agent_finds_a_requester_gone_under_its_identity(
    fleet: LocalFleet, auth_dir: Path, as_user: Any
) -> None:
    """The agent's probes (a reply-to on its own inbox, where NATS says "no responders") work
    within its permissions: a request whose sender closed its connection stops at its Ollama."""
    sim = SimServer(default_sims(1, load_overhead_s=600.0)[0], host="127.0.0.1", port=0)  # loads for long
    await sim.start()
    fleet.sims.append(sim)
    fleet.options.agent = {"ping_interval_s": 0.2} | creds(auth_dir, agent_user(SOLO))
    cfg = sim.config
    agent = await fleet.add_agent(
        Backend(sim.url, cfg.vendor, cfg.num_parallel, gpus=sim_gpus(cfg)), agent_id=SOLO
    )
    try:
        sender = await as_user(gateway_user("gw2"))
        subjects = Subjects(ROOT)
        reply = subjects.reply("gw2", "r9")
        sub = await sender.nc.subscribe(reply)
        env = RequestEnvelope(rid="r9", endpoint="/api/generate", model=parse_name(MODEL).token)
        body = b'{"model":"%s","prompt":"hi"}' % MODEL.encode()
        await sender.nc.publish(subjects.agent_work(SOLO), body, reply=reply, headers=env.headers())
        async with asyncio.timeout(10):
            while ((await sub.next_msg(timeout=10)).headers or {}).get(H.KIND) != H.PING:
                pass  # claimed; its Ollama is loading the model
        await sender.nc.close()
        await sim.stats.wait_for(lambda st: st.cancelled >= 1, timeout=20)
        assert_no_violation(fleet)
    finally:
        await agent.stop()


async def test_the_registry_probes_every_agent_under_its_identity(fleet: LocalFleet) -> None:
    """The registry's probes (each agent's cancel subject) are within both identities' rights."""
    assert fleet.registry is not None and fleet.registry._prober is not None
    answers = await fleet.registry._prober.probe_once()
    assert answers and set(answers.values()) == {Presence.ANSWERED}, answers  # every agent it knows
    assert_no_violation(fleet)


@pytest.mark.parametrize("service", ["gateway", "agent", "registry", "aggregator"])
async def test_a_service_refused_by_nats_exits_1_and_says_why(server: NatsServer, service: str) -> None:
    """A wrong (here: no) identity is a configuration error: the process says so in one line and
    exits 1 for its supervisor, instead of retrying for ever."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"corral.{service}", "--nats", server.url, "--root", ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    text = err.decode()
    assert "refused this process" in text and "Authorization Violation" in text
    assert "Traceback" not in text


async def test_the_batch_api_runs_under_a_gateways_identity(fleet: LocalFleet, as_user: Any) -> None:
    """The gateway (as ``gateway-gw1``) makes the Batch API's stores on the first upload and runs a
    batch through them — files, records, results, the line stream and its consumer — without one
    permissions violation; an agent may touch none of them."""
    from tests.integration.batch_helpers import exactly_once, jsonl, outcome, request, submit, wait_until

    assert fleet.gateway is not None and fleet.gateway.nc is not None
    lines = [request(i, model="llama3.2:latest") for i in range(4)]
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as c:
        b = await submit(c, jsonl(lines))
        done = await wait_until(c, fleet.gateway.nc.jetstream(), ROOT, b.id)
        assert done.status == "completed", done
        out, err = await outcome(c, done)
        assert [b.id async for b in c.batches.list()] == [b.id]
    exactly_once(out, err, [x["custom_id"] for x in lines])
    assert len(out) == 4
    assert_no_violation(fleet)
    agent = await as_user(agent_user(AGENTS[0]))
    s = Subjects(ROOT)
    await agent.nc.publish(s.kv_key(s.batches_bucket, b.id), b"{}")
    await agent.denied(f'Publish to "$KV.{s.batches_bucket}.{b.id}"')
    await agent.nc.publish(s.batch_line(b.id), b"{}")
    await agent.denied(f'Publish to "{s.batch_line(b.id)}"')
