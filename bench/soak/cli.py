"""``python -m bench.soak``: the flags, the run (load, kills and restarts, RSS samples, progress
lines) and the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import loop_name, machine, rss_bytes, run, write_json
from bench.soak.fleet import HOST, Fleet
from bench.soak.load import Load, Record
from bench.soak.report import RssSample, RssSeries, Summary, Tally, progress_line, scan_logs, summarize

LOAD_NAME = "bench (load)"
DRAIN_S = 30.0  # at the end, how long requests in flight may finish before they are cancelled
PROGRESS_S = 60.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="A long mixed streaming load on a whole Corral fleet of OS processes while agents "
        "are SIGKILLed and restarted: lost requests and RSS growth.",
    )
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    p.add_argument("--agents", type=int, default=4, help="agents, each beside its own simulator (default 4)")
    p.add_argument(
        "--steady-agents",
        type=int,
        default=1,
        help="agents never killed, so at least one agent's RSS is judged over the whole run (default 1)",
    )
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument(
        "--kill-every-s",
        type=float,
        default=60.0,
        help="SIGKILL one agent, round robin, this often; 0 = never (default 60)",
    )
    p.add_argument(
        "--restart-after-s",
        type=float,
        default=20.0,
        help="restart a killed agent, same id, this much later (default 20)",
    )
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period (default 10)")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="RSS after warm-up = the first sample at or after this (default: 300, or 1/6 of a shorter run)",
    )
    p.add_argument("--time-scale", type=float, default=0.02, help="simulators' time scale (default 0.02)")
    p.add_argument(
        "--parallel", type=int, default=4, help="slots per model on each simulator and agent (default 4)"
    )
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="agents' heartbeat (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the request mix (default 1)")
    p.add_argument(
        "--rebalance-s",
        type=float,
        help="the registry's rebalancing time constant (default: the registry's own); 0 = off, to compare",
    )
    p.add_argument(
        "--conversations",
        type=int,
        default=512,
        help="chats open with one of this many openings, a steady working set for the session caches; "
        "0 = every chat anew, so the caches fill toward their bounds (default 512)",
    )
    p.add_argument("--log-dir", help="where each process's log goes (default: a new temporary folder, kept)")
    p.add_argument(
        "--log-level", default="WARNING", help="log level of every Corral process (default WARNING)"
    )
    p.add_argument("--json", metavar="FILE", help="also write every sample, event and figure as JSON here")
    return p


@dataclass
class Run:
    """What the run records as it goes."""

    args: argparse.Namespace
    fleet: Fleet
    load: Load
    series: dict[str, RssSeries] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    kills: int = 0
    restarts: list[asyncio.Task[None]] = field(default_factory=list)  # pending ones end with the load
    reported_exits: set[str] = field(default_factory=set)

    def now(self) -> float:
        return time.monotonic() - self.load.t0

    def event(self, what: str, **more: Any) -> None:
        self.events.append({"t": round(self.now(), 3), "event": what, **more})

    # -- RSS -----------------------------------------------------------------------------------------
    def sample(self) -> dict[str, int]:
        t = self.now()
        pids = {**self.fleet.pids(), LOAD_NAME: os.getpid()}
        rss: dict[str, int] = {}
        for name, pid in pids.items():
            value = rss_bytes(pid)
            if not value:
                continue
            s = self.series.setdefault(name, RssSeries(name, judged=name != LOAD_NAME))
            s.samples.append(RssSample(round(t, 3), pid, value))
            rss[name] = value
        for name, code in self.fleet.exited().items():
            if name not in self.reported_exits:
                self.reported_exits.add(name)
                self.event("exited", process=name, returncode=code)
                print(
                    f"!! {name} exited by itself (status {code}); its log: {self.fleet.log_dir / name}.log",
                    flush=True,
                )
        return rss

    async def sampler(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.args.sample_s)

    # -- faults --------------------------------------------------------------------------------------
    async def killer(self, tg: asyncio.TaskGroup) -> None:
        victims = list(range(self.args.steady_agents, self.args.agents))
        n = 0
        while True:
            await asyncio.sleep(self.args.kill_every_s)
            i = victims[n % len(victims)]
            n += 1
            if not self.fleet.agent_alive(i):
                self.event("kill skipped", agent=self.fleet.agent_id(i), why="not running")
                continue
            await self.fleet.kill_agent(i)
            self.kills += 1
            self.event("kill", agent=self.fleet.agent_id(i), requests_in_flight=self.load.in_flight)
            self.restarts.append(tg.create_task(self.restart_later(i)))

    async def restart_later(self, i: int) -> None:
        await asyncio.sleep(self.args.restart_after_s)
        t = time.monotonic()
        await self.fleet.restart_agent(i)
        self.event("restart", agent=self.fleet.agent_id(i))
        try:
            await self.fleet.wait_agents({i}, timeout=60)
        except RuntimeError as e:
            self.event("rejoin failed", agent=self.fleet.agent_id(i), why=str(e)[:300])
            print(f"!! {self.fleet.agent_id(i)} did not rejoin: {e}", flush=True)
            return
        self.event("rejoined", agent=self.fleet.agent_id(i), after_s=round(time.monotonic() - t, 3))

    def notes(self) -> list[str]:
        rejoins = [e["after_s"] for e in self.events if e["event"] == "rejoined"]
        failed = sum(1 for e in self.events if e["event"] == "rejoin failed")
        if not rejoins and not failed:
            return []
        return [
            f"agents restarted: {len(rejoins) + failed}; listed by the gateway again "
            f"{min(rejoins, default=0):.2f}–{max(rejoins, default=0):.2f} s after their start; "
            f"{failed} never were"
        ]

    # -- progress ------------------------------------------------------------------------------------
    async def reporter(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            self.report_progress()

    def report_progress(self) -> None:
        t = self.now()
        records = self.load.records
        window: list[Record] = []
        for r in reversed(records):
            if r.t_end < t - PROGRESS_S:
                break
            window.append(r)
        up = sum(self.fleet.agent_alive(i) for i in range(self.args.agents))
        rss = {name: s.samples[-1].rss for name, s in self.series.items() if s.samples}
        total = Tally.of(records)
        print(progress_line(t, window, total, up, self.args.agents, rss), flush=True)
        self.progress.append(
            {
                "t": round(t, 3),
                "last_minute": Tally.of(window).as_json(),
                "agents_up": up,
                "total": total.as_json(),
            }
        )


async def soak(args: argparse.Namespace, workdir: Path, log_dir: Path, stop_early: asyncio.Event) -> Summary:
    duration = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else min(300.0, duration / 6)
    t_start = time.monotonic()
    fleet = Fleet(
        workdir=workdir,
        log_dir=log_dir,
        agents=args.agents,
        parallel=args.parallel,
        time_scale=args.time_scale,
        heartbeat_s=args.heartbeat_s,
        log_level=args.log_level,
        rebalance_s=args.rebalance_s,
    )
    async with fleet:
        print(
            f"fleet up in {time.monotonic() - t_start:.1f} s: gateway :{fleet.ports.gateway}, nats "
            f":{fleet.ports.nats} (nats-server pid {fleet.nats_server_pid}), {args.agents} agents; "
            f"load for {args.minutes:g} min, {args.clients} clients, warm-up {warmup_s:.0f} s",
            flush=True,
        )
        load = Load(
            f"http://{HOST}:{fleet.ports.gateway}",
            args.clients,
            seed=args.seed,
            conversations=args.conversations,
        )
        state = Run(args, fleet, load)
        async with asyncio.TaskGroup() as tg:
            load_task = tg.create_task(load.run())
            await asyncio.sleep(0)  # let the load set its clock before anything reads it
            aux = [tg.create_task(state.sampler()), tg.create_task(state.reporter())]
            if args.kill_every_s > 0 and args.agents > args.steady_agents:
                aux.append(tg.create_task(state.killer(tg)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_early.wait(), duration)
            if stop_early.is_set():
                print(f"stopping early at {state.now():.0f} s (interrupted)", flush=True)
            load.stop()
            for task in [*aux, *state.restarts]:
                task.cancel()
            _, pending = await asyncio.wait({load_task}, timeout=DRAIN_S)
            for task in pending:
                task.cancel()
        if state.now() % PROGRESS_S > 5:
            state.report_progress()
        state.sample()
        exited = fleet.exited()
        notes = [*state.notes(), await placement(fleet)]
        names = list(fleet.procs)
        summary = summarize(
            load.records,
            list(state.series.values()),
            warmup_s,
            scan_logs(log_dir, names),
            exited,
            state.kills,
            notes,
        )
    summary.data.update(
        {
            "config": dict(vars(args)),
            "warmup_s": warmup_s,
            "machine": machine(),
            "commit": _commit(),
            "events": state.events,
            "progress": state.progress,
            "samples": {
                name: [[s.t, s.pid, s.rss] for s in series.samples] for name, series in state.series.items()
            },
            "log_dir": str(log_dir),
        }
    )
    return summary


async def placement(fleet: Fleet) -> str:
    """Where each model is loaded at the end, as the gateway's ``/api/ps`` lists it."""
    url = f"http://{HOST}:{fleet.ports.gateway}/api/ps"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(url) as r,
        ):
            body: dict[str, Any] = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return f"loaded at the end: /api/ps failed ({e})"
    where: dict[str, list[str]] = {}
    for row in body.get("models", []):
        where.setdefault(row.get("name", "?"), []).append(row.get("corral", {}).get("agent", "?"))
    return "loaded at the end: " + "; ".join(
        f"{m} on {', '.join(sorted(a))}" for m, a in sorted(where.items())
    )


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()
    return ""


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    stop_early = asyncio.Event()

    def interrupt() -> None:
        """First Ctrl-C (or SIGTERM): end the load now and report; a second: stop at once."""
        if stop_early.is_set():
            me.cancel()
        stop_early.set()

    def watch() -> None:
        while True:
            signal.sigwait(STOP_SIGNALS)
            with contextlib.suppress(RuntimeError):  # the loop has closed: the run is over anyway
                loop.call_soon_threadsafe(interrupt)

    threading.Thread(target=watch, name="soak-signals", daemon=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="corral-soak-"))
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="corral-soak-logs-"))
    print(f"machine: {machine()}; load generator on {loop_name()}; logs in {log_dir}", flush=True)
    try:
        summary = await soak(args, workdir, log_dir, stop_early)
        print()
        print(summary.text, flush=True)
        if args.json:
            write_json(args.json, summary.data)
            print(f"\nwrote {args.json}")
        print(f"logs in {log_dir}")
        return 0 if summary.passed else 1
    except (RuntimeError, OSError) as e:
        print(f"bench.soak failed: {e}\nlogs in {log_dir}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    args = parser().parse_args()
    if args.steady_agents < 0 or args.agents < 1 or args.clients < 1 or args.sample_s <= 0:
        parser().error("--agents, --clients and --sample-s must be positive, --steady-agents not negative")
    # Ctrl-C and SIGTERM are taken by one thread with sigwait, blocked everywhere else (children
    # unblock them before exec), whatever handlers the event loop installs or not. A background
    # job of a non-interactive shell starts with SIGINT ignored, which would discard it: default.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
