"""Does the gateway stay fast with a large fleet? 10 agents versus N (default 1,000), in one run.

    .venv/bin/python -m bench.scale [--agents 1000] [--quick] [--control-plane] [--json out.json]

Processes:

* an embedded nats-server (JetStream), started by this process;
* the gateway, in this process (``Gateway`` under uvicorn on uvloop, as ``corral gateway`` runs
  it), so its fleet view (``gateway.fleet``) is read directly; the load generator (httptools, one
  keep-alive connection per concurrent request) shares this process and its event loop;
* one fleet process (``python -m bench.scale --fleet-worker``) with a handful of in-process
  simulators (no delays, the model preloaded) and the agents: real ``corral.agent.agent.Agent``
  objects, each with its own NATS connection, several agents per simulator. Agents re-read their
  simulator every ``--refresh`` seconds (default 3600: the backend reads are not what is measured)
  and heartbeat every ``--heartbeat`` seconds (default 5, the production default). They are told
  the simulators' default context (`SIM_CONTEXT`), so every preloaded runner is warm from the start;
* with ``--control-plane``, ``corral registry`` and ``corral aggregator``, each its own process, whose
  CPU and RSS are measured too.

Steps: start 10 agents and time until the gateway's fleet view lists all of them; measure at
steady state the KV watch messages/s the gateway receives, its CPU and RSS, and request latency
at concurrency 1 and throughput at concurrency 16; then add agents up to N and measure the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    Child,
    Phase,
    closed_loop,
    cpu_seconds,
    fmt,
    free_port,
    loop_name,
    machine,
    post,
    rss_bytes,
    run,
    table,
    write_json,
)

HOST = "127.0.0.1"
MODEL = "llama3.2"
BODY = msgspec.json.encode({"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}})
SIM_PARALLEL = 32
# The simulators' OLLAMA_CONTEXT_LENGTH, told to the agents (CORRAL_CONTEXT_LENGTH) as a deployment
# should: an agent that assumes another default counts a runner warm only once it has served one.
SIM_CONTEXT = 2048


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the fleet process -----------------------------------------------------------------------------
async def fleet_worker(args: argparse.Namespace) -> int:
    """Simulators and agents; commands on stdin (``add N``, ``quit``), answers on stdout."""
    from corral.agent.agent import Agent
    from corral.agent.settings import AgentSettings
    from corral.simulator import SimServer, load_config

    logging.basicConfig(level=logging.WARNING, format="fleet %(levelname)s %(name)s: %(message)s")
    _raise_fd_limit()
    sims: list[SimServer] = []
    agents: list[Agent] = []
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def start_agent(i: int) -> None:
        sim = sims[i % len(sims)]
        settings = AgentSettings(
            nats_url=args.nats,
            root=args.root,
            id=f"bench-{i:05d}",
            ollama_url=sim.url,
            vendor="nvidia" if i % 2 == 0 else "amd",
            parallel=1,
            context_length=SIM_CONTEXT,
            heartbeat_s=args.heartbeat,
            refresh_s=args.refresh,
            log_level="WARNING",
        )
        agent = Agent(settings)
        task = asyncio.create_task(agent.run(), name=settings.id)
        ready = asyncio.create_task(agent.ready.wait())
        await asyncio.wait((task, ready), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
            raise RuntimeError(f"agent {settings.id} stopped during start")
        agents.append(agent)
        tasks.append(task)

    try:
        for i in range(args.sims):
            cfg = load_config(
                None,
                time_scale=0,
                num_parallel=SIM_PARALLEL,
                max_queue=4096,
                context_length=SIM_CONTEXT,
                seed=i,
                vram_gb=80,
            )
            sim = SimServer(cfg, host=HOST, port=0)
            await sim.start()
            sims.append(sim)
        # preload (an empty prompt loads the model) so every agent advertises it as loaded
        import aiohttp

        async with aiohttp.ClientSession() as http:
            for sim in sims:
                async with http.post(f"{sim.url}/api/generate", json={"model": MODEL, "prompt": ""}) as r:
                    r.raise_for_status()
        say(f"ready {len(sims)}")
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                break
            cmd, _, arg = line.partition(" ")
            if cmd == "add":
                target = int(arg)
                t0 = time.perf_counter()
                while len(agents) < target:
                    batch = range(len(agents), min(target, len(agents) + args.batch))
                    await asyncio.gather(*(start_agent(i) for i in batch))
                say(f"added {len(agents)} {time.perf_counter() - t0:.3f}")
    finally:
        # no drain grace needed: nothing is in flight when the benchmark stops
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for sim in sims:
            await sim.stop()
        say("bye")
    return 0


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass
class Sample:
    agents: int
    register_s: float = 0.0  # from "add" until the gateway's fleet view lists them all
    started_s: float = 0.0  # as the fleet process saw it: until every new agent was ready
    watch_msgs_s: float = 0.0
    watch_window_s: float = 0.0
    watch_load_msgs_s: float = 0.0  # KV watch messages/s during the c=16 phase
    gateway_cpu_pct: float = 0.0  # this process (gateway + idle load generator) during the window
    gateway_rss: int = 0
    fleet_cpu_pct: float = 0.0
    fleet_rss: int = 0
    nats_cpu_pct: float = 0.0
    nats_rss: int = 0
    c1: Phase = field(default_factory=Phase)
    c16: Phase = field(default_factory=Phase)
    # --control-plane: name → (CPU % idle, CPU % during c=16, RSS) of `corral registry`/`aggregator`
    control: dict[str, tuple[float, float, int]] = field(default_factory=dict)


class Fleet:
    """The fleet process, driven over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, args: argparse.Namespace, nats_url: str) -> Fleet:
        argv = [
            sys.executable, "-m", "bench.scale", "--fleet-worker", "--nats", nats_url, "--root", args.root,
            "--sims", str(args.sims), "--heartbeat", str(args.heartbeat), "--refresh", str(args.refresh),
            "--batch", str(args.batch),
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        fleet = cls(proc)
        line = await fleet.read(60)
        if not line.startswith("ready"):
            raise RuntimeError(f"fleet process did not start: {line!r}")
        return fleet

    async def read(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError("the fleet process exited")
        return raw.decode().strip()

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send("quit")
                await asyncio.wait_for(self.proc.wait(), 60)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()


async def grow(fleet: Fleet, gateway: Any, n: int, timeout: float) -> tuple[float, float]:
    """Add agents up to ``n``; (seconds until the fleet view lists n, seconds the fleet took to start them)."""
    t0 = time.perf_counter()
    await fleet.send(f"add {n}")
    deadline = t0 + timeout
    view = gateway.fleet
    while len(view.agents()) < n:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"the gateway lists {len(view.agents())} of {n} agents after {timeout:.0f}s")
        await view.wait_changed(min(left, 1.0))
    registered = time.perf_counter() - t0
    line = await fleet.read(max(deadline - time.perf_counter(), 1.0))
    _, total, took = line.split()
    if int(total) != n:
        raise RuntimeError(f"the fleet process reports {total} agents, expected {n}")
    return registered, float(took)


async def sample(
    s: Sample,
    gateway: Any,
    port: int,
    fleet_pid: int,
    nats_pid: int,
    args: argparse.Namespace,
    control: Sequence[Child] = (),
) -> None:
    # steady state: wait until the start-up burst of state puts is over (one heartbeat and a bit)
    await asyncio.sleep(args.settle)
    view = gateway.fleet
    pids = (os.getpid(), fleet_pid, nats_pid, *(c.pid for c in control))
    cpu0 = {p: cpu_seconds(p) for p in pids}
    rev0, t0 = view.revision, time.perf_counter()
    await asyncio.sleep(args.window)
    rev1, t1 = view.revision, time.perf_counter()
    cpu1 = {p: cpu_seconds(p) for p in pids}
    s.watch_window_s = t1 - t0
    s.watch_msgs_s = (rev1 - rev0) / s.watch_window_s
    s.gateway_cpu_pct = (cpu1[os.getpid()] - cpu0[os.getpid()]) / s.watch_window_s * 100
    s.fleet_cpu_pct = (cpu1[fleet_pid] - cpu0[fleet_pid]) / s.watch_window_s * 100
    s.nats_cpu_pct = (cpu1[nats_pid] - cpu0[nats_pid]) / s.watch_window_s * 100
    s.gateway_rss, s.fleet_rss, s.nats_rss = rss_bytes(), rss_bytes(fleet_pid), rss_bytes(nats_pid)

    raw = post(HOST, port, "/api/generate", BODY)
    # warm-up: enough requests that most agents have served one (their keep-alive to the simulator)
    await closed_loop(HOST, port, raw, concurrency=16, requests=max(200, 2 * s.agents), time_cap=5.0)
    s.c1 = await closed_loop(HOST, port, raw, concurrency=1, requests=args.requests, time_cap=args.cap)
    rev0 = view.revision
    busy0 = {c.pid: cpu_seconds(c.pid) for c in control}
    s.c16 = await closed_loop(HOST, port, raw, concurrency=16, requests=args.requests * 4, time_cap=args.cap)
    s.watch_load_msgs_s = (view.revision - rev0) / s.c16.wall_s if s.c16.wall_s else 0.0
    for c in control:
        idle = (cpu1[c.pid] - cpu0[c.pid]) / s.watch_window_s * 100
        busy = (cpu_seconds(c.pid) - busy0[c.pid]) / s.c16.wall_s * 100 if s.c16.wall_s else 0.0
        s.control[c.name] = (idle, busy, rss_bytes(c.pid))
    for ph in (s.c1, s.c16):
        if ph.errors:
            bad = next(r for r in ph.results if r.error or r.status != 200)
            print(f"  {ph.errors} failed requests; first: status={bad.status} {bad.error}", flush=True)


def report(small: Sample, big: Sample) -> tuple[str, dict[str, Any]]:
    def mb(b: int) -> float:
        return b / (1 << 20)

    rows_def: list[tuple[str, float | int, float | int]] = [
        ("agents registered", small.agents, big.agents),
        ("registration: until the gateway lists them (s)", small.register_s, big.register_s),
        ("registration: agents started, fleet side (s)", small.started_s, big.started_s),
        ("KV watch msgs/s at the gateway (idle)", small.watch_msgs_s, big.watch_msgs_s),
        ("KV watch msgs/s at the gateway (c=16 load)", small.watch_load_msgs_s, big.watch_load_msgs_s),
        ("gateway process CPU, idle (% of a core)", small.gateway_cpu_pct, big.gateway_cpu_pct),
        ("gateway process RSS (MiB)", mb(small.gateway_rss), mb(big.gateway_rss)),
        ("nats-server CPU, idle (% of a core)", small.nats_cpu_pct, big.nats_cpu_pct),
        ("nats-server RSS (MiB)", mb(small.nats_rss), mb(big.nats_rss)),
        ("fleet process CPU, idle (% of a core)", small.fleet_cpu_pct, big.fleet_cpu_pct),
        ("fleet process RSS (MiB)", mb(small.fleet_rss), mb(big.fleet_rss)),
        ("latency p50, c=1 (ms)", small.c1.lat_ms(50), big.c1.lat_ms(50)),
        ("latency p99, c=1 (ms)", small.c1.lat_ms(99), big.c1.lat_ms(99)),
        ("req/s, c=1", small.c1.rps, big.c1.rps),
        ("latency p50, c=16 (ms)", small.c16.lat_ms(50), big.c16.lat_ms(50)),
        ("latency p99, c=16 (ms)", small.c16.lat_ms(99), big.c16.lat_ms(99)),
        ("req/s, c=16", small.c16.rps, big.c16.rps),
        ("latency max, c=16 (ms)", small.c16.max_ms(), big.c16.max_ms()),
        (
            "requests over 1 s (c=1 + c=16)",
            small.c1.slow() + small.c16.slow(),
            big.c1.slow() + big.c16.slow(),
        ),
        ("failed requests", small.c1.errors + small.c16.errors, big.c1.errors + big.c16.errors),
    ]
    for name in big.control:
        (idle_a, busy_a, rss_a), (idle_b, busy_b, rss_b) = small.control[name], big.control[name]
        rows_def += [
            (f"{name} CPU, idle (% of a core)", idle_a, idle_b),
            (f"{name} CPU, c=16 load (% of a core)", busy_a, busy_b),
            (f"{name} RSS (MiB)", mb(rss_a), mb(rss_b)),
        ]
    rows = []
    data: dict[str, Any] = {}
    for label, a, b in rows_def:
        ratio = f"{b / a:.2f}x" if a and a == a and b == b else "—"
        whole = isinstance(a, int) and isinstance(b, int)
        rows.append([label, str(a) if whole else fmt(a), str(b) if whole else fmt(b), ratio])
        data[label] = {str(small.agents): a, str(big.agents): b}
    per_agent = (big.gateway_rss - small.gateway_rss) / max(big.agents - small.agents, 1)
    text = table(["metric", f"{small.agents} agents", f"{big.agents} agents", "ratio"], rows)
    text += f"\n\ngateway RSS growth per added agent: {per_agent / 1024:.1f} KiB"
    data["gateway_rss_per_agent_bytes"] = per_agent
    return text, data


async def amain(args: argparse.Namespace) -> int:
    from corral.gateway.app import Gateway
    from corral.gateway.settings import GatewaySettings
    from corral.runtime.natsserver import NatsServer
    from corral.runtime.process import AsgiServer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    fds = _raise_fd_limit()
    if fds < 3 * args.agents + 256:
        print(f"open-file limit {fds} is too low for {args.agents} agents", file=sys.stderr)
        return 1
    print(
        f"machine: {machine()}; {loop_name()}; {args.agents} agents on {args.sims} simulators, "
        f"heartbeat {args.heartbeat:g}s, refresh {args.refresh:g}s",
        flush=True,
    )
    nats = NatsServer(port=free_port())
    fleet: Fleet | None = None
    http: AsgiServer | None = None
    control: list[Child] = []  # --control-plane: `corral registry` and `corral aggregator`
    started = time.time()
    try:
        await nats.start()
        assert nats.pid is not None
        nats_pid = nats.pid
        gateway = Gateway(GatewaySettings(nats_url=nats.url, root=args.root, log_level="WARNING"))
        http = AsgiServer(gateway, HOST, free_port(), log_level="warning")
        await http.start()
        rss_empty = rss_bytes()
        if args.control_plane:
            logs = Path(tempfile.mkdtemp(prefix="bench-scale-"))
            corral = str(Path(sys.executable).with_name("corral"))
            for name in ("registry", "aggregator"):
                argv = [corral, name, "--nats", nats.url, "--root", args.root, "--log-level", "WARNING"]
                control.append(Child(name, argv, log_path=logs / f"{name}.log"))
                await control[-1].start()
        fleet = await Fleet.start(args, nats.url)
        samples = []
        for n in (args.small, args.agents):
            s = Sample(agents=n)
            s.register_s, s.started_s = await grow(fleet, gateway, n, args.register_timeout)
            print(f"{n} agents: listed by the gateway after {s.register_s:.2f}s", flush=True)
            await sample(s, gateway, http.port, fleet.proc.pid, nats_pid, args, control)
            for c in control:
                if not c.alive():
                    raise RuntimeError(f"{c.name} exited:\n{c.log_tail()}")
            print(
                f"  watch {s.watch_msgs_s:.1f} msgs/s, p50 {s.c1.lat_ms(50):.2f} ms, "
                f"p99 {s.c1.lat_ms(99):.2f} ms, c=16 {s.c16.rps:.0f} req/s",
                flush=True,
            )
            samples.append(s)
        text, data = report(samples[0], samples[1])
        print()
        print(text)
        print(f"gateway RSS before any agent: {rss_empty / (1 << 20):.1f} MiB")
        print(
            f"setup: {args.sims} in-process simulators shared by the agents; each agent has its own NATS "
            f"connection; heartbeat {args.heartbeat:g}s, backend refresh {args.refresh:g}s; "
            f"gateway and load generator share one process"
            + ("; `corral registry` and `corral aggregator` run beside it" if control else "")
        )
        if args.json:
            data |= {
                "machine": machine(),
                "nproc": os.cpu_count(),
                "command": " ".join(["python -m bench.scale", *sys.argv[1:]]),
                "heartbeat_s": args.heartbeat,
                "refresh_s": args.refresh,
                "sims": args.sims,
                "gateway_rss_empty_bytes": rss_empty,
                "started_at": started,
            }
            write_json(args.json, data)
            print(f"wrote {args.json}")
        return 0
    except (RuntimeError, OSError, TimeoutError) as e:
        print(f"bench.scale failed: {e}", file=sys.stderr)
        return 1
    finally:
        if fleet is not None:
            await asyncio.shield(fleet.stop())
        for c in control:
            await asyncio.shield(c.stop())
        if http is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(http.stop())
        await asyncio.shield(nats.stop())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=1000, help="the large fleet (default 1000)")
    p.add_argument("--small", type=int, default=10, help="the small fleet compared with (default 10)")
    p.add_argument("--quick", action="store_true", help="100 agents, short windows: a smoke run")
    p.add_argument("--sims", type=int, default=4, help="in-process simulators the agents share (default 4)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="agent heartbeat seconds (default 5)")
    p.add_argument(
        "--refresh", type=float, default=3600.0, help="agent backend refresh seconds (default 3600)"
    )
    p.add_argument("--batch", type=int, default=50, help="agents started concurrently (default 50)")
    p.add_argument("--requests", type=int, default=2000, help="requests at c=1 (x4 at c=16; default 2000)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    p.add_argument(
        "--control-plane",
        action="store_true",
        help="also run `corral registry` and `corral aggregator` and report their CPU and RSS",
    )
    p.add_argument("--root", default="bench", help="subject root (default bench)")
    p.add_argument("--fleet-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nats", default="", help=argparse.SUPPRESS)
    return p


def main() -> int:
    args = parser().parse_args()
    if args.fleet_worker:
        return run(fleet_worker(args))
    if args.quick:
        args.agents = min(args.agents, 100)
        args.requests = min(args.requests, 300)
    args.settle = args.heartbeat + 1.0 if not args.quick else min(args.heartbeat, 2.0)
    args.window = 2 * args.heartbeat if not args.quick else args.heartbeat
    args.cap = 10.0 if not args.quick else 2.0
    args.register_timeout = 120.0 + args.agents * 0.2
    try:
        return run(amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
