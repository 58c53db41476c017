"""Routing end to end over real NATS: sessions, num_ctx, one load per cold model, the fleet queue,
demand-driven replicas. Simulated Ollamas; counts come from their own statistics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import ollama
import pytest
from corral.agent.worker import Job
from corral.client import AsyncClient
from corral.gateway.sessions import Sessions
from corral.protocol import headers as H
from corral.protocol.messages import AgentState
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.registry.placement import marker_key
from corral.routing import Route, loading_for, warm
from corral.runtime.buckets import ensure_buckets
from corral.runtime.nats import connect, round_trip
from corral.runtime.natsserver import NatsServer
from corral.runtime.workqueue import Puller, consumer_name, depths, enqueue, withdraw
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError

from tests.integration import waits
from tests.integration.fleet_helpers import preload, queue_and_serve, until

MODEL = "llama3.2"
KEY = parse_name(MODEL).key
HOLD = (10**6, 10**6)  # replies this long hold their slot until the test lets go


def _options(nats_server: NatsServer, root: str, sims: int = 3, **kw: Any) -> FleetOptions:
    sim_kw = kw.pop("sim", {})
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(sims, **({"time_scale": 0.02} | sim_kw)),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0} | kw.pop("agent", {}),
        gateway={"queue_timeout_s": 20.0} | kw.pop("gateway", {}),
        registry={"replica_check_s": 0.0} | kw.pop("registry", {}),
        **kw,
    )


def _served(fleet: LocalFleet) -> list[int]:
    return [s.stats.finished for s in fleet.sims]


async def test_follow_up_turns_return_to_the_conversations_agent(nats_server: NatsServer, root: str) -> None:
    """Every turn of a chat lands on one agent and re-uses its prompt cache; round robin does not."""
    async with LocalFleet(_options(nats_server, root)) as fleet:
        await preload(fleet, MODEL)  # warm everywhere: only the session decides

        async def converse(strategy: str) -> tuple[list[int], int]:
            before = [s.stats.prompt_tokens_cached for s in fleet.sims]
            counts_before = _served(fleet)
            history: list[dict[str, str]] = [{"role": "system", "content": f"you are terse ({strategy})"}]
            async with ollama.AsyncClient(
                host=fleet.url, headers={"X-Load-Balancing-Strategy": strategy}
            ) as client:
                for turn in range(4):
                    history.append({"role": "user", "content": f"turn {turn}: tell me more " * 20})
                    r = await client.chat(model=MODEL, messages=history, options={"num_predict": 8})
                    history.append({"role": "assistant", "content": r.message.content or ""})
            per_sim = [a - b for a, b in zip(_served(fleet), counts_before, strict=True)]
            cached = sum(s.stats.prompt_tokens_cached for s in fleet.sims) - sum(before)
            return per_sim, cached

        auto_turns, auto_cached = await converse("auto")
        rr_turns, rr_cached = await converse("round_robin")
        assert sorted(auto_turns) == [0, 0, 4]  # one agent served the whole conversation
        assert max(rr_turns) < 4
        assert auto_cached > 2 * max(rr_cached, 1)  # the history was read from the cache, not again


async def test_session_is_found_through_kv_by_another_gateway(nats_server: NatsServer, root: str) -> None:
    nc = await connect(nats_server.url, name="t")
    try:
        buckets = await ensure_buckets(nc.jetstream(), Subjects(root))
        one, two = Sessions(buckets.sessions), Sessions(buckets.sessions)
        one.remember("abc123", "nvidia-0")
        await one.close()  # the write is done
        assert await two.lookup("abc123") == "nvidia-0"
        assert await two.lookup("unknown") is None
    finally:
        await nc.close()


async def test_requests_go_where_their_num_ctx_runner_is_loaded(nats_server: NatsServer, root: str) -> None:
    """A runner at 8192 on one agent, at the default on the other: no request causes a reload."""
    async with LocalFleet(_options(nats_server, root, sims=2)) as fleet:
        async with ollama.AsyncClient(host=fleet.sims[0].url) as c:
            await c.generate(model=MODEL, prompt="", options={"num_ctx": 8192})
        async with ollama.AsyncClient(host=fleet.sims[1].url) as c:
            await c.generate(model=MODEL, prompt="")
        for a in fleet.agents:
            a._wake.refresh.set()
        gw = fleet.gateway
        assert gw is not None
        ids = [a.id for a in fleet.agents]
        await until(fleet, lambda: all(gw.fleet.is_loaded(i, KEY) for i in ids))
        before = _served(fleet)
        async with ollama.AsyncClient(host=fleet.url) as client:
            for _ in range(4):
                await client.generate(model=MODEL, prompt="wide", options={"num_ctx": 8192, "num_predict": 4})
            for _ in range(4):
                await client.generate(model=MODEL, prompt="default", options={"num_predict": 4})
        served = [a - b for a, b in zip(_served(fleet), before, strict=True)]
        assert served == [4, 4]
        assert [s.stats.reloads for s in fleet.sims] == [0, 0]


@pytest.mark.parametrize("registry", [True, False], ids=["registry", "gateway-alone"])
async def test_a_burst_on_a_cold_model_starts_one_load(
    nats_server: NatsServer, root: str, registry: bool
) -> None:
    """50 concurrent requests for a model no one has loaded: one load, none fails — placed by the
    registry, or by the gateway's own markers when no registry runs."""
    opts = _options(nats_server, root, sim={"time_scale": 0.2, "num_parallel": 4})
    if not registry:
        opts.registry = None
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "burst", "stream": False, "options": {"num_predict": 4}}

        async def one() -> int:
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(50)))
        assert statuses == [200] * 50
        assert sum(sim.stats.loads for sim in fleet.sims) == 1
        assert sum(_served(fleet)) == 50
        if registry:
            assert fleet.registry is not None and fleet.registry.placer is not None
            assert fleet.registry.placer.loads_started == 1


async def _one_slot_held(
    fleet: LocalFleet, s: aiohttp.ClientSession, root: str
) -> tuple[Subscription, aiohttp.ClientResponse]:
    """The fleet's one slot taken by an endless generation, and a subscription to the queue's
    nudges (one per request queued)."""
    await preload(fleet, MODEL)
    gw = fleet.gateway
    assert gw is not None and gw.nc is not None
    nudges = await gw.nc.subscribe(f"{root}.queued.>")
    hold = await s.post(
        fleet.url + "/api/generate",
        json={"model": MODEL, "prompt": "hold", "options": {"num_predict": 10**6}},
    )
    assert hold.status == 200
    return nudges, hold


async def test_queued_requests_are_served_in_arrival_order(nats_server: NatsServer, root: str) -> None:
    """One slot, held; five requests queue one after another; they finish in that order."""
    opts = _options(
        nats_server, root, sims=1, sim={"time_scale": 0.02, "num_parallel": 1, "reply_tokens": HOLD}
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        nudges, hold = await _one_slot_held(fleet, s, root)
        done: list[int] = []

        async def one(i: int) -> None:
            body = {"model": MODEL, "prompt": f"q{i}", "stream": False, "options": {"num_predict": 2}}
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 200
                await r.read()
                done.append(i)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(one(i)))
            await nudges.next_msg(timeout=10)  # request i is in the queue before i + 1 is sent
        hold.close()  # the slot frees: the agent serves the queue, oldest first
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert done == [0, 1, 2, 3, 4]


async def test_a_queued_request_taken_and_never_claimed_is_routed_again(
    nats_server: NatsServer, root: str
) -> None:
    """An agent takes a queued request off the fleet queue and dies before it claims it (here a
    bare taker that never answers): the waiting gateway sees it taken and unclaimed, routes it
    again, and the request is served when a slot frees, long before its queue deadline."""
    opts = _options(
        nats_server,
        root,
        sims=1,
        sim={"time_scale": 0.02, "num_parallel": 1, "reply_tokens": HOLD},
        gateway={"queue_timeout_s": 60.0, "claim_timeout_s": 0.5, "queue_recheck_s": 0.2},
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        nudges, hold = await _one_slot_held(fleet, s, root)
        body = {"model": MODEL, "prompt": "taken", "stream": False, "options": {"num_predict": 2}}
        started = time.monotonic()
        request = asyncio.create_task(s.post(fleet.url + "/api/generate", json=body))
        nudge = await nudges.next_msg(timeout=10)  # it waits in the queue
        queue_subject = nudge.subject.replace(f"{root}.queued.", f"{root}.queue.", 1)
        nc = await connect(nats_server.url, name="taker")
        try:
            assert len(await Puller(nc, Subjects(root)).take(queue_subject, 1)) == 1  # and is gone
        finally:
            await nc.close()
        await nudges.next_msg(timeout=10)  # queued again: routed anew, not left to its deadline
        hold.close()  # the slot frees: the agent serves the queue
        async with asyncio.timeout(20):
            r = await request
        assert r.status == 200, await r.text()
        assert (await r.json())["done"]
        assert time.monotonic() - started < 30  # its queue deadline is 60 s


async def _served_though_takes_go_unanswered(
    nats_server: NatsServer,
    root: str,
    monkeypatch: pytest.MonkeyPatch,
    unanswered: Callable[[str, int], bool],
) -> int:
    """One slot, held; a request waits in the fleet queue; the slot frees while the agent's pulls
    of the queue go unanswered where ``unanswered(subject, pulls of it so far)`` says. Asserts the
    request is served long before its queue deadline; returns how many pulls went unanswered."""
    opts = _options(
        nats_server,
        root,
        sims=1,
        sim={"time_scale": 1.0, "num_parallel": 1, "reply_tokens": HOLD},  # kept loaded for minutes
        gateway={"queue_timeout_s": 60.0},
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        nudges, hold = await _one_slot_held(fleet, s, root)
        body = {"model": MODEL, "prompt": "waits", "stream": False, "options": {"num_predict": 2}}
        request = asyncio.create_task(s.post(fleet.url + "/api/generate", json=body))
        await nudges.next_msg(timeout=10)  # it waits in the queue (the unpinned lane)
        pull, pulls, missed = Puller._pull, Counter[str](), 0

        async def pull_or_not(self: Puller, subject: str, n: int, timeout: float) -> tuple[list[Msg], bool]:
            nonlocal missed
            pulls[subject] += 1
            if unanswered(subject, pulls[subject] - 1):
                missed += 1
                return [], False  # what a pull the queue did not answer returns
            return await pull(self, subject, n, timeout)

        monkeypatch.setattr(Puller, "_pull", pull_or_not)
        hold.close()  # the slot frees: the agent looks at the queue
        async with asyncio.timeout(30):  # its queue deadline is 60 s
            r = await request
        assert r.status == 200, await r.text()
        assert (await r.json())["done"]
        return missed


async def test_a_take_the_queue_did_not_answer_is_tried_again_with_nothing_else_to_wake_it(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot frees and the agent's first take of the fleet queue goes unanswered (JetStream
    electing a leader, say): no nudge comes again and no other event wakes the agent, so it takes
    again by itself a moment later, and the request is served instead of waiting for its deadline."""
    first: list[str] = []

    def first_pull(subject: str, before: int) -> bool:
        if not first:
            first.append(subject)
            return True
        return False

    assert await _served_though_takes_go_unanswered(nats_server, root, monkeypatch, first_pull) == 1


async def test_a_queue_lane_that_never_answers_holds_up_no_other_lane(
    nats_server: NatsServer, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's lane for requests pinned to its vendor never answers (its consumer cannot be
    made or has no leader, as in a cluster's election); the unpinned lane does, and the request
    waiting there is served when the slot frees."""
    pinned = Subjects(root).queue("nvidia", parse_name(MODEL).token)
    missed = await _served_though_takes_go_unanswered(
        nats_server, root, monkeypatch, lambda subject, _: subject == pinned
    )
    assert missed >= 1


async def test_back_to_back_requests_find_the_freed_slot_armed(nats_server: NatsServer, root: str) -> None:
    """One slot; each request is sent the moment the previous answer arrives. The agent arms the
    freed slot's claim before the answer's last message, not later in its background reconcile
    (held here), so every request is claimed off the claim subject: none falls back to a direct
    send or the fleet queue."""
    # a claim answered late (a stalled machine) would go to the fleet queue, which the held
    # reconcile never reads: the claims get all the time they need
    gateway = {"warm_claim_timeout_s": 10.0, "claim_timeout_s": 10.0}
    opts = _options(nats_server, root, sims=1, sim={"time_scale": 0.0, "num_parallel": 1}, gateway=gateway)
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        gw, agent = fleet.gateway, fleet.agents[0]
        assert gw is not None and gw.nc is not None
        body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}

        async def run(n: int) -> None:
            for _ in range(n):
                async with s.post(fleet.url + "/api/generate", json=body) as r:
                    assert r.status == 200
                    await r.read()

        await run(5)  # the first claim is armed and the newly-warm queue check is done
        reconcile, held = agent._reconcile, asyncio.Event()

        async def after_the_test() -> None:
            await held.wait()
            await reconcile()

        agent._reconcile = after_the_test  # type: ignore[method-assign]
        claims = await gw.nc.subscribe(f"{root}.work.>")
        fallbacks = await gw.nc.subscribe(f"{root}.agent.*.work")
        nudges = await gw.nc.subscribe(f"{root}.queued.>")
        assert await round_trip(gw.nc, 10.0)
        await run(50)
        assert await round_trip(gw.nc, 10.0)
        held.set()
        assert claims.pending_msgs == 50
        assert (fallbacks.pending_msgs, nudges.pending_msgs) == (0, 0)


@pytest.mark.parametrize("registry", [True, False], ids=["registry", "no-registry"])
async def test_a_failed_load_is_not_waited_on_by_the_next_request(
    nats_server: NatsServer, root: str, registry: bool
) -> None:
    """A model that cannot fit: each request gets Ollama's own 500 from its own load attempt. The
    failed load's marker is dropped (here and at the registry), so the next request does not queue
    behind a load that is not under way."""
    opts = _options(nats_server, root, sims=1, sim={"time_scale": 0.0, "num_parallel": 64})
    if not registry:
        opts.registry = None
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        gw = fleet.gateway
        assert gw is not None and gw.nc is not None
        nudges = await gw.nc.subscribe(f"{root}.queued.>")
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        for _ in range(3):
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 500
                assert (await r.json())["error"].startswith("model requires more system memory")
        assert await round_trip(gw.nc, 10.0)
        assert nudges.pending_msgs == 0  # none of them waited in the fleet queue
        assert fleet.sims[0].stats.failed == 3  # each one tried its own load


async def test_a_failed_load_is_not_waited_on_while_the_agents_state_still_shows_it_loading(
    nats_server: NatsServer, root: str
) -> None:
    """The agent's state saying its load is over can reach the gateway after the load's error reply
    does (a KV write and a watch, against a reply), and a state published while it was loading can
    even arrive after that reply. For `load_grace_s` after the failure a state showing the load
    under way is not believed, so the next request tries a load of its own instead of waiting
    behind the failed one."""
    opts = _options(
        nats_server,
        root,
        sims=1,
        sim={"time_scale": 0.0, "num_parallel": 64},
        gateway={"load_grace_s": 30.0},  # however slow this machine is between the two requests
    )
    opts.registry = None  # the gateway's own view decides whether a load is under way
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        gw, agent = fleet.gateway, fleet.agents[0]
        assert gw is not None and gw.nc is not None and agent._worker is not None
        key = parse_name(MODEL).key
        run, publish = agent._worker.run, agent._publish_state
        go, failed, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
        loading: list[AgentState] = []

        async def held_run(job: Job) -> int:
            await go.wait()  # the load stays under way until the gateway has seen it so
            return await run(job)

        async def held_publish(state: AgentState | None = None, *args: object) -> None:
            state = state or agent.state()
            if key in state.loading:
                loading.append(state)
            if failed.is_set() and key not in state.loading:
                await release.wait()  # the state saying the load is over comes late
            await publish(state, *args)  # type: ignore[arg-type]

        agent._worker.run = held_run  # type: ignore[method-assign]
        agent._publish_state = held_publish  # type: ignore[method-assign]
        nudges = await gw.nc.subscribe(f"{root}.queued.>")
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        try:
            first = asyncio.ensure_future(s.post(fleet.url + "/api/generate", json=body))
            await until(fleet, lambda: (a := gw.fleet.get(agent.id)) is not None and key in a.loading)
            failed.set()
            go.set()
            async with asyncio.timeout(10):
                r = await first
            assert r.status == 500
            heard = gw.fleet.heard(agent.id)
            await publish(loading[-1])  # a state of the load under way, heard after its failure
            await until(fleet, lambda: gw.fleet.heard(agent.id) != heard)
            a = gw.fleet.get(agent.id)
            assert a is not None and key in a.loading  # the gateway sees the load under way
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                assert r.status == 500
                assert (await r.json())["error"].startswith("model requires more system memory")
            assert await round_trip(gw.nc, 10.0)
            assert nudges.pending_msgs == 0  # it did not wait in the fleet queue
            assert fleet.sims[0].stats.failed == 2
        finally:
            go.set()
            release.set()


async def test_unplace_drops_only_the_marker_of_the_failed_load(nats_server: NatsServer, root: str) -> None:
    """A late unplace from a gateway whose load failed must not drop a newer load's marker."""
    async with LocalFleet(_options(nats_server, root, sims=1)) as fleet:
        assert fleet.registry is not None
        placer, token = fleet.registry.placer, parse_name(MODEL).token
        assert await placer._claim(token, None, "newer") is None  # a newer load, on another agent
        assert not await placer.unplace(token, None, None, "failed")
        assert (await placer.kv.get(marker_key(token, None))).value  # still there
        assert await placer.unplace(token, None, None, "newer")
        with pytest.raises(KeyNotFoundError):
            await placer.kv.get(marker_key(token, None))


async def test_full_queue_answers_503_at_once(nats_server: NatsServer, root: str) -> None:
    opts = _options(
        nats_server,
        root,
        sims=1,
        sim={"num_parallel": 1, "reply_tokens": HOLD},
        gateway={"queue_depth": 1, "queue_timeout_s": 30.0},
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        gw = fleet.gateway
        assert gw is not None and gw.nc is not None
        nudges = await gw.nc.subscribe(f"{root}.queued.>")
        long = {"model": MODEL, "prompt": "hold", "options": {"num_predict": 10**6}}
        hold = await s.post(fleet.url + "/api/generate", json=long)
        waiting = asyncio.ensure_future(s.post(fleet.url + "/api/generate", json=long))
        await nudges.next_msg(timeout=10)
        async with s.post(fleet.url + "/api/generate", json={**long, "stream": False}) as r:
            assert r.status == 503
        # refused by the depth limit, not by the deadline: the request queued first is still waiting
        assert not waiting.done()
        hold.close()
        (await waiting).close()


async def test_a_queued_request_the_queues_reader_passed_over_is_routed_again(
    nats_server: NatsServer, root: str
) -> None:
    """A request still in the queue stream at a sequence its reader has already handed out: no agent
    will get it (a nats-server killed outright came back with its consumer's position saved and the
    removal of the taken request lost; here another reader takes it and never acknowledges). The
    gateway sees the reader past it while the stream still holds it, and routes it again: it is
    served once a slot frees, where it used to wait for its deadline with the agent idle."""
    opts = _options(
        nats_server,
        root,
        sims=1,
        sim={"num_parallel": 1, "reply_tokens": HOLD, "time_scale": 1.0},
        gateway={"queue_timeout_s": 20.0, "queue_recheck_s": 0.5},
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        gw = fleet.gateway
        assert gw is not None and gw.nc is not None
        subjects = Subjects(root)
        nudges = await gw.nc.subscribe(f"{root}.queued.>")
        long = {"model": MODEL, "prompt": "hold", "options": {"num_predict": 480}}  # seconds of the only slot
        hold = await s.post(fleet.url + "/api/generate", json=long)
        short = {"model": MODEL, "prompt": "next", "stream": False, "options": {"num_predict": 2}}
        waiting = asyncio.ensure_future(s.post(fleet.url + "/api/generate", json=short))
        await nudges.next_msg(timeout=10)  # it waits in the queue
        subject = subjects.queue("any", parse_name(MODEL).token)
        stray = gw.nc.new_inbox()
        taken = await gw.nc.subscribe(stray)
        await gw.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.queue_stream}.{consumer_name(subject)}",
            b'{"batch": 1}',
            reply=stray,
        )
        got = await taken.next_msg(timeout=10)  # handed out, never acknowledged: in the stream for 30 s
        assert H.REQUEST in (got.headers or {}), got.headers  # the request itself, not a status
        await (
            hold.read()
        )  # it ends: the slot frees, the model stays warm, and the agent finds nothing to take
        async with asyncio.timeout(40):  # a bound only: its own deadline (20 s) would answer 503
            async with await waiting as r:
                assert r.status == 200, await r.text()


async def test_a_busy_warm_agent_makes_auto_load_a_second_replica(nats_server: NatsServer, root: str) -> None:
    """Warm on one single-slot agent only: a load elsewhere beats queueing behind it (once)."""
    opts = _options(nats_server, root, sims=2, sim={"time_scale": 1.0, "num_parallel": 1})
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await _warm_first_only(fleet)
        body = {"model": MODEL, "prompt": "work", "stream": False, "options": {"num_predict": 100}}

        async def one() -> int:
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                await r.read()
                return r.status

        assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8
        assert fleet.sims[1].stats.loads == 1  # one more load, not one per waiting request
        assert fleet.sims[1].stats.finished > 1  # the new replica served part of the queue


async def test_an_agent_whose_slot_went_since_its_state_is_not_made_to_queue_the_request(
    nats_server: NatsServer, root: str
) -> None:
    """The slot of the one warm agent is taken by another sender (a direct NATS client), whose
    request this gateway never counted, before the agent publishes its state: the gateway's view
    still shows it free. Its warm claim finds no free slot; the direct send that follows is marked
    now, so the agent answers busy instead of queueing the request behind work that may run for
    minutes, and the gateway, counting that agent full, loads the model elsewhere."""
    # heartbeats a minute apart: the held state does not make the agent dead meanwhile
    opts = _options(
        nats_server, root, sims=3, sim={"num_parallel": 1, "reply_tokens": HOLD}, agent={"heartbeat_s": 60.0}
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await _warm_first_only(fleet)
        gw, first = fleet.gateway, fleet.agents[0]
        assert gw is not None
        await until(fleet, lambda: all(a.in_flight == 0 for a in gw.fleet.agents()))
        published = first._publish_state

        async def held(*args: Any) -> None:
            return None  # the agent's state is as the gateway last heard it

        first._publish_state = held  # type: ignore[method-assign]
        try:
            async with AsyncClient(nats_server.url, root=root) as other:
                holding = await other.generate(MODEL, "long", stream=True)
                assert first.slots.free(parse_name(MODEL).token) == 0
                assert [a.in_flight for a in gw.fleet.agents() if a.id == first.id] == [0]
                body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
                async with asyncio.timeout(20):  # behind the held replies it would wait for ever
                    async with s.post(fleet.url + "/api/generate", json=body) as r:
                        assert r.status == 200
                        await r.read()
                        assert r.headers["X-Corral-Agent"] != first.id
                assert first.slots.queued == 0
                await holding.aclose()
        finally:
            first._publish_state = published  # type: ignore[method-assign]


async def test_registry_loads_a_replica_when_a_queue_keeps_growing(
    nats_server: NatsServer, root: str
) -> None:
    """Requests wait in the fleet queue behind a held slot; the registry, nudged by the queue, loads
    the model on the other agent, which then serves them from the same queue. (Its fallback resync
    is a minute away: the nudges did it.)"""
    opts = _options(
        nats_server,
        root,
        sims=2,
        sim={"time_scale": 0.2, "num_parallel": 1, "reply_tokens": HOLD},
        registry={"replica_check_s": 60.0},
    )
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await _warm_first_only(fleet)
        long = {"model": MODEL, "prompt": "hold", "options": {"num_predict": 10**6}}
        hold = await s.post(fleet.url + "/api/generate", json=long)
        await queue_and_serve(fleet, MODEL, 3, num_predict=2)  # queued as a gateway queues them
        assert fleet.sims[1].stats.loads == 1
        assert fleet.sims[1].stats.finished == 1 + 3  # the registry's preload, then the queue
        assert fleet.registry is not None and fleet.registry.placer is not None
        assert fleet.registry.placer.replicator.loads_started == 1
        hold.close()


async def test_registry_scales_a_cold_burst_out_while_the_first_load_runs(
    nats_server: NatsServer, root: str
) -> None:
    """A burst on a cold model queues behind its one placed load; the registry sees a queue nothing
    can drain before that load ends and starts the loads it needs beside it — not after it, and on
    the queue's nudges, not on a poll (the fallback resync is a minute away)."""
    opts = _options(
        nats_server,
        root,
        sims=3,
        # a load of about a second and a half of wall time: long beside the replica check
        sim={"time_scale": 0.05, "num_parallel": 1, "load_bandwidth": 7e7, "reply_tokens": (300, 300)},
        registry={"replica_check_s": 60.0},
    )
    loads_when_first_done: list[int] = []

    def first_load_done(_: object) -> bool:
        if not loads_when_first_done and any(sim.stats.loads_completed for sim in fleet.sims):
            loads_when_first_done.append(sum(sim.stats.loads for sim in fleet.sims))
        return bool(loads_when_first_done)

    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        watch = [asyncio.create_task(sim.stats.wait_for(first_load_done, timeout=60)) for sim in fleet.sims]
        # replies long enough that one slot cannot drain the queue before the replicas are up
        body = {"model": MODEL, "prompt": "burst", "stream": False}

        async def one() -> int:
            async with s.post(fleet.url + "/api/generate", json=body) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(20)))
        await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        for t in watch:
            t.cancel()
        assert statuses == [200] * 20
        # 20 waiting requests want 10 slots: every agent loads it, each once, all at the same time
        assert [sim.stats.loads for sim in fleet.sims] == [1, 1, 1]
        assert loads_when_first_done == [3]
        # each replica's preload (an empty generate) ends with its load, then it serves the queue
        assert all(n >= 2 for n in _served(fleet)), _served(fleet)
        assert sum(_served(fleet)) == 20 + 2


async def test_a_model_listed_while_it_loads_is_loading_not_warm(nats_server: NatsServer, root: str) -> None:
    """Ollama lists a runner in /api/ps from the moment its load begins. The agent keeps reporting
    it as loading — no claims, not warm to the router — until Ollama answers a request on it."""
    opts = _options(nats_server, root, sims=1, sim={"time_scale": 0.05, "load_bandwidth": 7e7})
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        gw, agent, sim = fleet.gateway, fleet.agents[0], fleet.sims[0]
        assert gw is not None
        body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        request = asyncio.create_task(s.post(fleet.url + "/api/generate", json=body))
        await sim.stats.wait_for(lambda st: st.loads == 1)
        async with s.get(sim.url + "/api/ps") as r:
            assert [m["name"] for m in (await r.json())["models"]] == ["llama3.2:latest"]
        agent._wake.refresh.set()

        def state() -> AgentState | None:
            return gw.fleet.get(agent.id)

        await until(fleet, lambda: bool((a := state()) and a.loaded))  # the refresh saw the listed runner
        listed = state()
        assert listed is not None and KEY in listed.loading and not warm(Route(key=KEY), listed)
        assert sim.stats.loads_completed == 0  # still loading
        assert parse_name(MODEL).token not in agent.runners.warm  # no claims on a loading runner
        async with await request as r:
            assert r.status == 200
        await until(fleet, lambda: bool((a := state()) and warm(Route(key=KEY), a) and not a.loading))


async def test_a_reload_at_another_context_shows_as_loading_for_that_context(
    nats_server: NatsServer, root: str
) -> None:
    """A warm default runner that Ollama replaces for a request's own num_ctx is loading — for that
    context — until Ollama answers: no use to default requests meanwhile, and no claims."""
    opts = _options(nats_server, root, sims=1, sim={"time_scale": 0.05, "load_bandwidth": 7e7})
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        gw, agent, sim = fleet.gateway, fleet.agents[0], fleet.sims[0]
        assert gw is not None
        body = {
            "model": MODEL,
            "prompt": "wide",
            "stream": False,
            "options": {"num_ctx": 8192, "num_predict": 2},
        }
        request = asyncio.create_task(s.post(fleet.url + "/api/generate", json=body))

        def state() -> AgentState | None:
            return gw.fleet.get(agent.id)

        await until(fleet, lambda: bool((a := state()) and a.loading))
        await sim.stats.wait_for(lambda st: st.reloads == 1)  # Ollama's side of the same reload
        reloading = state()
        assert reloading is not None and sim.stats.loads_completed == 1
        assert reloading.loading_ctx == {KEY: 8192}
        assert loading_for(Route(key=KEY, num_ctx=8192), reloading)
        assert not loading_for(Route(key=KEY), reloading) and not warm(Route(key=KEY), reloading)
        assert parse_name(MODEL).token not in agent.runners.warm  # default claims withdrawn
        async with await request as r:
            assert r.status == 200
        await until(fleet, lambda: bool((a := state()) and not a.loading))
        done = state()
        assert done is not None and warm(Route(key=KEY, num_ctx=8192), done)


async def test_a_model_stays_loading_while_a_request_waits_to_reload_it_at_its_context(
    nats_server: NatsServer, root: str
) -> None:
    """A reload for a wide request, and a default request behind it: when the wide one is answered
    the model is still loading — now for the default context the next reload gives it."""
    opts = _options(nats_server, root, sims=1, sim={"time_scale": 0.05, "load_bandwidth": 7e7})
    async with LocalFleet(opts) as fleet, aiohttp.ClientSession() as s:
        await preload(fleet, MODEL)
        gw, agent, sim = fleet.gateway, fleet.agents[0], fleet.sims[0]
        assert gw is not None

        def state() -> AgentState | None:
            return gw.fleet.get(agent.id)

        wide = {"model": MODEL, "prompt": "wide", "options": {"num_ctx": 8192, "num_predict": 20}}
        narrow = {"model": MODEL, "prompt": "default", "stream": False, "options": {"num_predict": 2}}
        first = asyncio.create_task(s.post(fleet.url + "/api/generate", json=wide))
        await until(fleet, lambda: bool((a := state()) and a.loading_ctx == {KEY: 8192}))
        behind = asyncio.create_task(s.post(fleet.url + "/api/generate", json=narrow))
        await sim.stats.wait_for(lambda st: st.started == 2)  # both at Ollama: one reloading, one waiting
        async with await first as r:  # the wide request is answered: its runner is up
            await until(fleet, lambda: bool((a := state()) and a.loading_ctx == {KEY: 0}))
            listed = state()
            assert listed is not None and not warm(Route(key=KEY), listed)
            assert parse_name(MODEL).token not in agent.runners.warm
            await r.read()
        async with await behind as r2:
            assert r2.status == 200
        await until(fleet, lambda: bool((a := state()) and not a.loading and warm(Route(key=KEY), a)))
        assert sim.stats.reloads == 2


async def _warm_first_only(fleet: LocalFleet) -> None:
    async with ollama.AsyncClient(host=fleet.sims[0].url) as c:
        await c.generate(model=MODEL, prompt="")
    fleet.agents[0]._wake.refresh.set()
    gw = fleet.gateway
    assert gw is not None
    await until(fleet, lambda: gw.fleet.is_loaded(fleet.agents[0].id, KEY))


@pytest.mark.parametrize("strategy", ["round_robin", "least_connection"])
async def test_seed_strategies_still_route(nats_server: NatsServer, root: str, strategy: str) -> None:
    async with LocalFleet(_options(nats_server, root, gateway={"strategy": strategy})) as fleet:
        await preload(fleet, MODEL)
        async with ollama.AsyncClient(host=fleet.url) as client:
            for _ in range(6):
                await client.generate(model=MODEL, prompt="x", options={"num_predict": 2})
        assert sum(_served(fleet)) == 6 + len(fleet.sims)  # the preloads count too


async def test_queue_order_deadline_and_withdrawal(nats_server: NatsServer, root: str) -> None:
    """The stream itself: oldest first across takes, expired entries dropped, withdrawn ones gone."""
    nc = await connect(nats_server.url, name="t")
    try:
        subjects = Subjects(root)
        await ensure_buckets(nc.jetstream(), subjects)
        js, puller = nc.jetstream(), Puller(nc, subjects)
        subject = subjects.queue("any", "m")
        future = str(int((time.time() + 60) * 1000))
        for i in range(5):
            await enqueue(nc, js, subjects, "any", "m", b"%d" % i, {H.DEADLINE: future, H.REPLY: "r"})
        assert [m.data for m in await puller.take(subject, 2)] == [b"0", b"1"]
        msgs, drained = await puller.take_batch(subject, 10)
        assert [m.data for m in msgs] == [b"2", b"3", b"4"] and drained
        assert await puller.take(subject, 1) == []
        past = str(int((time.time() - 1) * 1000))
        await enqueue(nc, js, subjects, "any", "m", b"late", {H.DEADLINE: past, H.REPLY: "r"})
        # dropped, its gateway has answered already; the take pulled again and found the queue dry
        assert await puller.take_batch(subject, 1) == ([], True)
        # and gone from the stream: nats-server confirms an ack before a work queue drops the
        # message, so the depth is read again after each round trip to the server
        seen: list[object] = []

        async def emptied() -> bool:  # and if not, what the stream and the consumer say
            left = await depths(nc, subjects)
            if left:
                consumer = await js.consumer_info(subjects.queue_stream, consumer_name(subject))
                seen[:] = [left, consumer.delivered, consumer.ack_floor, consumer.num_ack_pending]
            return not left

        await waits.until(emptied, lambda t: round_trip(nc, max(t, 0.01)), timeout=5.0, state=lambda: seen)
        queued = await enqueue(nc, js, subjects, "any", "m", b"gone", {H.DEADLINE: future, H.REPLY: "r"})
        assert await withdraw(js, queued)
        assert await puller.take(subject, 1) == []
        assert not await withdraw(js, queued)  # nothing left to withdraw
    finally:
        await nc.close()


async def test_agent_learns_the_backends_real_default_context(nats_server: NatsServer, root: str) -> None:
    """The agent is told the wrong default (8192; its Ollama uses 2048): the first request without
    num_ctx shows the real one, and from then on the runner is advertised for such requests."""
    opts = _options(nats_server, root, sims=1, sim={"context_length": 2048}, agent={"context_length": 8192})
    async with LocalFleet(opts) as fleet:
        agent, gw = fleet.agents[0], fleet.gateway
        assert gw is not None
        async with ollama.AsyncClient(host=fleet.url) as client:
            await client.generate(model=MODEL, prompt="first", options={"num_predict": 2})
            await until(fleet, lambda: gw.fleet.get(agent.id).default_ctx.get(KEY) == 2048)  # type: ignore[union-attr]
            assert parse_name(MODEL).token in agent.runners.warm  # claims advertised again
            for _ in range(3):
                await client.generate(model=MODEL, prompt="next", options={"num_predict": 2})
        assert fleet.sims[0].stats.reloads == 0
