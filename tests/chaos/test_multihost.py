"""A host cut off from the network under load: its work moves to the other host, the fleet view
drops its agents, and when its cable is back they serve again, with no process restarted.

Three hosts are network namespaces on one bridge (`tests.chaos.netns`): host A runs NATS, the
registry, the aggregator and the gateway; hosts B (AMD) and C (NVIDIA) each run two simulated
Ollama servers on their own loopback, with an agent beside each. Every one is a real process. The
test process sends a few clients' worth of short generate requests, streaming and not, to the
gateway on A, holds two long streams that only B may serve, and pulls B's cable (its veth set down
on the bridge) in the middle of it:

- every request begun after the cut is answered in full, B's agents routed around; one under way at
  the cut (B's long streams at least) ends, well or with an error line, and never hangs;
- ``/api/status`` stops listing B's agents within a few heartbeats;
- with the cable back, B's agents are listed again and serve again (the agents' own
  ``events.request`` messages, what the aggregator's rates are made of, name who served), and every
  process is the one started at the beginning, still running; at the end each service stops
  cleanly, and no process logged a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import nats
import pytest
from corral.protocol.messages import request_finished_decoder
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.chaos.netns import Lan, NetnsUnavailable, Proc, Processes
from tests.integration.waits import Changes, until

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

T = TypeVar("T")

MODEL = "llama3.2"
HOSTS = {"a": 1, "b": 2, "c": 3}  # name → last byte of its address
AGENTS = {"b": ("b1", "b2"), "c": ("c1", "c2")}  # host → the agents (and simulators) it runs
EVERYONE = {a for ids in AGENTS.values() for a in ids}
B_VENDOR = "amd"  # B's servers are AMD, C's NVIDIA: a vendor pin reaches B (README "Vendor pins")
VENDORS = {"b": B_VENDOR, "c": "nvidia"}
HEARTBEAT_S = 0.5  # three missed = dead: B's agents should leave the view 1.5 s after the cut
CLIENTS = 4
PARALLEL = 2  # slots per server
# The simulators decode 600 tokens/s (time scale 0.01 × speed 0.05): a short request takes a few
# tens of milliseconds, a long stream seconds. Only ``num_predict`` shortens a reply.
SIM_FLAGS = ("--time-scale", "0.01", "--speed", "0.05", "--num-parallel", str(PARALLEL))
SIM_CONFIG = "reply_tokens = [3000, 3000]\n"
SHORT_TOKENS = 8
LONG_TOKENS = 3000
LONG_STREAMS = 2  # held by B at the cut, leaving B slots free for short requests to be sent to
REQUEST_TIMEOUT_S = 10.0  # a request still unanswered after this has hung
READY_S = 40.0  # every process up (a dozen Python processes starting at once on a small machine)
GONE_WITHIN_S = 6.0
BACK_WITHIN_S = 20.0  # TCP retransmits back off while the cable is out: the first one after may wait
SERVED_WITHIN_S = 15.0
AFTER_CUT = 12  # requests begun after B left the view that must have ended before its cable is back
POLL_S = 0.1  # /api/status has no change feed: the waits on it poll, bounded by a deadline
# A request sent to a cut-off agent is tried elsewhere after 1 s without a claim; a stream such an
# agent was answering ends with an error line after 2 s of silence (its agent pings every 0.5 s).
GATEWAY_FLAGS = ("--claim-timeout-s", "1", "--idle-timeout-s", "2", "--queue-timeout-s", "15")


@dataclass(frozen=True)
class Outcome:
    model: str
    stream: bool
    started: float
    first: float | None  # when the first line of the answer arrived
    ended: float
    ok: bool  # 200 and a whole answer: the last line says done, no line is an error
    detail: str = ""
    hung: bool = False


class Load:
    """A few clients, each sending one short request after another until told to stop: streaming
    and not, every third one pinned to host B's vendor (which may go elsewhere when B cannot)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.outcomes: list[Outcome] = []
        self.stop = asyncio.Event()
        self._done = Changes()

    async def one(
        self,
        model: str,
        *,
        stream: bool,
        tokens: int = SHORT_TOKENS,
        headers: dict[str, str] | None = None,
        first_line: asyncio.Event | None = None,
    ) -> Outcome:
        body = {
            "model": model,
            "prompt": "hi",
            "stream": stream,
            "keep_alive": -1,
            "options": {"num_predict": tokens},
        }
        started, first = time.monotonic(), None
        lines: list[bytes] = []
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        try:
            async with self.session.post(
                f"{self.url}/api/generate", json=body, headers=headers, timeout=timeout
            ) as r:
                async for line in r.content:
                    if first is None:
                        first = time.monotonic()
                        if first_line is not None:
                            first_line.set()
                    lines.append(line)
                status = r.status
        except TimeoutError:
            return Outcome(
                model, stream, started, first, time.monotonic(), False, "no answer in time", hung=True
            )
        except aiohttp.ClientError as e:
            return Outcome(model, stream, started, first, time.monotonic(), False, repr(e))
        ended = time.monotonic()
        try:
            parts = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError:
            parts = []  # not Ollama's NDJSON or JSON: e.g. a plain-text error page
        whole = (
            status == 200
            and len(parts) >= 1
            and (stream or len(parts) == 1)
            and not any("error" in p for p in parts)
            and parts[-1].get("done") is True
            and "".join(p.get("response", "") for p in parts) != ""
        )
        detail = "" if whole else f"{status} {b''.join(lines)[-300:]!r}"
        return Outcome(model, stream, started, first, ended, whole, detail)

    async def client(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            model = f"{B_VENDOR}/{MODEL}" if n % 3 == 0 else MODEL
            self.outcomes.append(await self.one(model, stream=(i + n) % 2 == 0))
            self._done.set()
            n += 1

    async def finished_since(self, t: float, count: int, timeout: float, what: str) -> None:
        """Until ``count`` requests begun at ``t`` or later have ended."""

        def begun() -> int:
            return sum(1 for o in self.outcomes if o.started >= t)

        await until(lambda: begun() >= count, self._done.wait, timeout=timeout, what=what, state=begun)


class Served:
    """Requests served well (status 200) per agent, from the agents' ``events.request`` messages."""

    def __init__(self) -> None:
        self.by_agent: Counter[str] = Counter()
        self._changed = Changes()

    async def on(self, msg: Msg) -> None:
        event = request_finished_decoder.decode(msg.data)
        if event.status == 200:
            self.by_agent[event.agent] += 1
            self._changed.set()

    def on_host(self, host: str) -> int:
        return sum(self.by_agent[a] for a in AGENTS[host])

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        await until(
            predicate, self._changed.wait, timeout=timeout, what=what, state=lambda: dict(self.by_agent)
        )


async def within(what: str, timeout: float, step: Awaitable[T]) -> T:
    """``step``, or a failure that says what did not happen in time."""
    try:
        return await asyncio.wait_for(step, timeout)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


async def live_agents(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The agents ``/api/status`` lists: those the gateway heard within their last 3 heartbeats."""
    async with session.get(f"{url}/api/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
        body = await r.json()
    return {a["id"]: a for a in body["agents"]}


async def poll_status(
    session: aiohttp.ClientSession,
    url: str,
    what: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float,
) -> float:
    """Seconds until ``predicate(live agents by id)`` holds, polling every `POLL_S`: there is no
    event to wait on, since the gateway judges liveness by the time since each last heartbeat."""
    t0, live = time.monotonic(), dict[str, Any]()

    async def holds() -> bool:
        nonlocal live
        live = await live_agents(session, url)
        return predicate(live)

    await until(
        holds, lambda s: asyncio.sleep(min(s, POLL_S)), timeout=timeout, what=what, state=lambda: sorted(live)
    )
    return time.monotonic() - t0


def preload(port: int) -> None:
    """Load the model on one simulator for good (``keep_alive: -1``), straight at its loopback."""
    body = json.dumps({"model": MODEL, "prompt": "", "keep_alive": -1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


@pytest.fixture
def lan() -> Iterator[Lan]:
    net = Lan(HOSTS)
    try:
        net.__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here ({e})")
    try:
        yield net
    finally:
        net.close()


@dataclass(frozen=True)
class Fleet:
    gateway: str  # the gateway's URL
    nats: str
    sim_ports: dict[str, int]  # agent → its simulator's port on its host's loopback


async def start_fleet(lan: Lan, procs: Processes, root: str, tmp: Path) -> Fleet:
    """Start every process and wait until each says it is ready."""
    sim_config = tmp / "sim.toml"
    sim_config.write_text(SIM_CONFIG)
    a = lan.addresses["a"]
    nats_port, gw_port, *sim_ports = random.sample(range(20000, 60000), 2 + 4)
    nats_url = f"nats://{a}:{nats_port}"
    common = ("--nats", nats_url, "--root", root)
    ready: list[tuple[Proc, str]] = []
    nats_proc = await procs.start(
        "nats", lan.hosts["a"], "corral.cli",
        ("nats", "--host", a, "--port", str(nats_port), "--store-dir", str(tmp / "js")),
    )  # fmt: skip
    await nats_proc.wait_line("nats-server with JetStream on", READY_S)
    # The registry first: it creates the KV buckets, which every other process then finds. Several
    # processes creating one bucket at the same moment may fail: once one has created the sessions
    # bucket and set its discard policy, another's create is refused as "a different configuration".
    registry = await procs.start("registry", lan.hosts["a"], "corral.registry", common)
    await registry.wait_line("registry ready", READY_S)
    for service, line, extra in (
        ("aggregator", "aggregator ready", ()),
        ("gateway", "gateway listening", ("--host", a, "--port", str(gw_port), *GATEWAY_FLAGS)),
    ):
        proc = await procs.start(service, lan.hosts["a"], f"corral.{service}", (*common, *extra))
        ready.append((proc, line))
    ports = dict(zip([i for ids in AGENTS.values() for i in ids], sim_ports, strict=True))
    for host, ids in AGENTS.items():
        for agent in ids:
            sim = await procs.start(
                f"sim-{agent}", lan.hosts[host], "corral.simulator",
                ("--host", "127.0.0.1", "--port", str(ports[agent]), "--config", str(sim_config),
                 "--vendor", VENDORS[host], *SIM_FLAGS),
            )  # fmt: skip
            ready.append((sim, "ollama-sim listening"))
    for host, ids in AGENTS.items():
        for agent in ids:
            proc = await procs.start(
                agent, lan.hosts[host], "corral.agent",
                (*common, "--id", agent, "--ollama", f"http://127.0.0.1:{ports[agent]}", "--vendor", VENDORS[host],
                 "--parallel", str(PARALLEL), "--heartbeat-s", str(HEARTBEAT_S), "--refresh-s", "0.5", "--ping-interval-s", "0.5",
                 "--advertise-host", f"host-{host}"),
            )  # fmt: skip
            ready.append((proc, "serving"))
    await asyncio.gather(*(p.wait_line(line, READY_S) for p, line in ready))
    return Fleet(f"http://{a}:{gw_port}", nats_url, ports)


async def test_a_host_cut_off_under_load_is_routed_around_and_serves_again_when_back(
    lan: Lan, tmp_path: Path, root: str
) -> None:
    env = {**os.environ, "CORRAL_LOG_LEVEL": "INFO"}
    with lan.entered():
        async with Processes(env) as procs:
            try:
                await scenario(lan, procs, root, tmp_path)
            except BaseException:
                sys.stderr.write(f"process output (last lines of each):\n{procs.dump()}\n")
                raise


@dataclass(frozen=True)
class Times:
    cutting: float  # just before the cable was pulled
    cut: float  # just after: a request begun from here on never reached B
    restoring: float
    gone_s: float  # from the cut until /api/status stopped listing B's agents
    back_s: float  # from the restore until it listed them again


async def scenario(lan: Lan, procs: Processes, root: str, tmp: Path) -> None:
    fleet = await start_fleet(lan, procs, root, tmp)
    started = {p.name: p for p in procs.procs}
    pids = {name: p.pid for name, p in started.items()}
    await asyncio.gather(
        *(
            lan.run_in(h, functools.partial(preload, fleet.sim_ports[a]))
            for h, ids in AGENTS.items()
            for a in ids
        )
    )
    nc = await nats.connect(fleet.nats)
    try:
        served = Served()
        await nc.subscribe(Subjects(root).event("request"), cb=served.on)
        async with aiohttp.ClientSession() as session:
            load = Load(session, fleet.gateway)
            times, held = await cut_and_restore(lan, nc, session, fleet.gateway, load, served)
    finally:
        await nc.close()

    # B's long streams were under way at the cut: each ended, well or with an error line
    for o in held:
        assert o.first is not None and o.first < times.cutting and not o.hung, o
        assert o.ok or "error" in o.detail, o
    outcomes = load.outcomes
    hung = [o for o in outcomes if o.hung]
    assert not hung, f"{len(hung)} requests hung: {hung[:3]}"
    later = [o for o in outcomes if o.started >= times.cut]
    failed = [o for o in later if not o.ok]
    assert not failed, f"{len(failed)} of {len(later)} requests begun after the cut failed: {failed[:3]}"
    earlier = [o for o in outcomes if o.ended < times.cutting]
    assert all(o.ok for o in earlier), [o for o in earlier if not o.ok][:3]
    at_cut = [o for o in outcomes if o.started < times.cut and o.ended >= times.cutting]

    for proc in procs.procs:  # the same processes as at the start, all still running
        assert proc.process.returncode is None, f"{proc.name} exited with {proc.process.returncode}"
        assert proc.pid == pids[proc.name]
    for agent in EVERYONE:  # an agent that started over inside its process would say so again
        assert sum("serving" in line for line in started[agent].lines) == 1, started[agent].tail()
    await procs.stop([p for p in procs.procs if p.name != "nats"])  # NATS last: nobody loses it
    await procs.stop()
    # none was killed: each Corral service stopped cleanly on SIGTERM (`corral nats` only wraps
    # nats-server here, and its exit code is not what this test is about), and none ever failed
    codes = {p.name: p.process.returncode for p in procs.procs if p.name != "nats" and p.process.returncode}
    assert not codes, f"exit codes: {codes}\n" + "\n".join(started[n].tail() for n in codes)
    for proc in procs.procs:
        assert not any("Traceback" in line for line in proc.lines), f"{proc.name}:\n{proc.tail()}"

    out = [o.ended - o.started for o in outcomes if times.cut <= o.started < times.restoring]
    sys.stderr.write(
        f"B left /api/status {times.gone_s:.2f}s after the cut and was back {times.back_s:.2f}s after "
        f"the restore; {len(outcomes)} short requests: {len(out)} begun while B was out (slowest "
        f"{max(out):.2f}s), {len(at_cut)} under way at the cut ({sum(o.ok for o in at_cut)} ended well); "
        f"B's long streams ended {[round(o.ended - times.cut, 2) for o in held]}s after the cut\n"
    )


async def cut_and_restore(
    lan: Lan,
    nc: NATS,
    session: aiohttp.ClientSession,
    url: str,
    load: Load,
    served: Served,
) -> tuple[Times, list[Outcome]]:
    """Under load: pull B's cable, wait for B to leave the fleet view, put it back, wait for B to
    serve again. The times, and the outcomes of the long streams B held at the cut."""

    def all_warm(live: dict[str, Any]) -> bool:  # the preloaded model shows on every agent
        return set(live) == EVERYONE and all(a["loaded"] for a in live.values())

    def both_serve() -> bool:
        return served.on_host("b") >= 3 and served.on_host("c") >= 3

    await poll_status(session, url, "every agent listed with the model loaded", all_warm, READY_S)
    clients = [asyncio.create_task(load.client(i)) for i in range(CLIENTS)]
    begun = [asyncio.Event() for _ in range(LONG_STREAMS)]
    longs = [
        asyncio.create_task(
            load.one(
                f"{B_VENDOR}/{MODEL}",
                stream=True,
                tokens=LONG_TOKENS,
                headers={"X-Enforce-Strategy": "true"},
                first_line=e,
            )
        )  # fmt: skip
        for e in begun
    ]
    try:
        await served.until(both_serve, SERVED_WITHIN_S, "both hosts serve")
        await within("B's long streams begin", SERVED_WITHIN_S, asyncio.gather(*(e.wait() for e in begun)))

        cutting = time.monotonic()
        lan.cut("b")
        cut = time.monotonic()
        gone_s = await poll_status(
            session, url, "B's agents unlisted", lambda live: set(live) == set(AGENTS["c"]), GONE_WITHIN_S
        )
        await load.finished_since(
            time.monotonic(), AFTER_CUT, REQUEST_TIMEOUT_S, "requests served while B is out"
        )

        restoring = time.monotonic()
        lan.restore("b")
        back_s = await poll_status(
            session, url, "B's agents listed again", lambda live: set(live) == EVERYONE, BACK_WITHIN_S
        )
        # One connection carries an agent's messages in order: once its fresh heartbeat has arrived,
        # so has every event it sent before; the flush makes sure this client has read them too.
        assert await round_trip(nc, 10.0)
        before = served.on_host("b")
        await served.until(lambda: served.on_host("b") > before, SERVED_WITHIN_S, "B serves again")
        held = [await within("B's long streams end", REQUEST_TIMEOUT_S + 5, t) for t in longs]
    finally:
        load.stop.set()
        for t in longs:
            t.cancel()
        await asyncio.wait([*clients, *longs], timeout=REQUEST_TIMEOUT_S + 5)
    return Times(cutting, cut, restoring, gone_s, back_s), held
