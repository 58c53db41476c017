"""A workload through a peer router (ollama-herd) instead of Corral's gateway.

The parent (`run_herd`, called by the benchmark for the policy ``herd``) makes a network namespace
with only loopback and runs this module inside it as a child process::

    ip netns exec NS python -m bench.routing.peer --workload W --seed S --time-scale T --cap C \\
        --venv HERD_VENV --workdir DIR [--quick]

The child (`HerdFleet`) starts the same simulators as Corral's runs (`fleet.fleet_sims`: the same
machines, seed and time scale) in its own process, herd's router and one herd node per simulator
as processes of their own, waits until the router lists every node with its models, brings the
workload's starting state (`Workload.preload`, loaded on the simulators directly), and drives the
workload at the router with no Corral header. It writes the `RunResult` (the simulators' own
counters, its CPU and the herd processes' CPU, herd's warnings) to ``DIR/result.json``. Whatever
happens, the parent then kills what is left in the namespace and deletes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from corral.simulator import SimServer

import bench
from bench.common import Child, fetch, free_port, get, run, tree_cpu_seconds, wait_port
from bench.routing.client import Clients
from bench.routing.fleet import CONTEXT_LENGTH, MACHINES, fleet_sims, load_directly
from bench.routing.herd import node_argv, node_env, router_argv, router_env
from bench.routing.netns import Namespace, exec_argv
from bench.routing.results import RunResult, result_from_json, result_to_json
from bench.routing.run import counters, run_result
from bench.routing.workloads import QUICK, WORKLOADS, Knobs

POLICY = "herd"
READY_TIMEOUT_S = 90.0  # seven Python processes starting at once on a small machine
POLL_S = 0.1  # herd's router offers no change stream: its status is read this often while waiting
SETUP_S = 240.0  # the child's start, preload and stop around the workload's cap
STOP_S = 15.0
REPO = Path(bench.__file__).resolve().parent.parent


class PeerFailed(RuntimeError):
    """The peer's run did not finish; the message is one line, the log folder is kept."""


def node_ids() -> list[str]:
    """One per simulator, named as Corral's agents are."""
    return [f"{m.vendor}-{i}" for i, m in enumerate(MACHINES)]


# -- the child: inside the namespace -----------------------------------------------------------------
class HerdFleet:
    """The simulators (in this process), herd's router and its nodes (child processes)."""

    def __init__(
        self, venv: Path, seed: int, time_scale: float, workdir: Path, context_length: int = CONTEXT_LENGTH
    ) -> None:
        self.venv, self.seed, self.time_scale, self.workdir = venv, seed, time_scale, workdir
        self.context_length = context_length
        self.sims: list[SimServer] = []
        self.children: list[Child] = []
        self.port = 0

    @property
    def router_log(self) -> Path:
        return self.workdir / "home" / "router" / ".fleet-manager" / "logs" / "herd.jsonl"

    async def start(self) -> None:
        for cfg in fleet_sims(self.seed, self.time_scale, self.context_length):
            sim = SimServer(cfg, host="127.0.0.1", port=0)
            await sim.start()
            self.sims.append(sim)
        self.port = free_port()
        router = self._child(
            "herd",
            router_argv(self.venv, self.port),
            router_env(self.venv, self._home("router"), self.time_scale),
        )
        await router.start()
        await wait_port(self.port, router, READY_TIMEOUT_S)
        url = f"http://127.0.0.1:{self.port}"
        for node_id, machine, sim in zip(node_ids(), MACHINES, self.sims, strict=True):
            env = node_env(self.venv, self._home(node_id), machine, sim.config, self.time_scale)
            await self._child(node_id, node_argv(self.venv, node_id, sim.url, url), env).start()
        await self.wait_until(self._all_nodes_ready, "every node online with its models")

    def _home(self, name: str) -> Path:
        home = self.workdir / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def _child(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, log_path=self.workdir / f"{name}.log", env=env)
        self.children.append(child)
        return child

    async def status(self) -> dict[str, Any]:
        """The router's ``/fleet/status``."""
        status, body = await fetch("127.0.0.1", self.port, get("127.0.0.1", self.port, "/fleet/status"))
        if status != 200:
            raise RuntimeError(f"herd /fleet/status: HTTP {status} {body[:200]!r}")
        out: dict[str, Any] = msgspec.json.decode(body)
        return out

    def _all_nodes_ready(self, status: dict[str, Any]) -> bool:
        return nodes_ready(status, node_ids())

    async def wait_loaded(self, models: Sequence[str]) -> None:
        await self.wait_until(
            lambda s: models_loaded(s, node_ids(), models), f"{', '.join(models)} loaded everywhere"
        )

    async def wait_until(self, ready: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Until ``ready(status)`` (bounded); fails at once when a herd process has exited."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for c in self.children:
                if not c.alive():
                    raise RuntimeError(f"{c.name} exited while waiting for {what}:\n{c.log_tail()}")
            with contextlib.suppress(OSError, ConnectionError, TimeoutError, RuntimeError):
                if ready(await self.status()):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"herd did not report {what} within {READY_TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_S)

    def cpu_seconds(self) -> float:
        """The herd processes' CPU seconds so far."""
        return sum(tree_cpu_seconds(c.pid) for c in self.children if c.alive())

    async def stop(self) -> None:
        """Nodes, then the router (SIGTERM, then SIGKILL to their process groups), then the simulators."""
        nodes, router = self.children[1:], self.children[:1]
        await asyncio.gather(*(c.stop(STOP_S) for c in nodes))
        await asyncio.gather(*(c.stop(STOP_S) for c in router))
        for sim in self.sims:
            await sim.stop()


def nodes_ready(status: dict[str, Any], ids: Sequence[str]) -> bool:
    """Every node of ``ids`` online in herd's ``/fleet/status``, with the models on its disk."""
    nodes = {n.get("node_id"): n for n in status.get("nodes", [])}
    return all(
        i in nodes
        and nodes[i].get("status") == "online"
        and (nodes[i].get("ollama") or {}).get("models_available")
        for i in ids
    )


def models_loaded(status: dict[str, Any], ids: Sequence[str], models: Sequence[str]) -> bool:
    """Every model of ``models`` loaded on every node of ``ids``, as herd's ``/fleet/status`` says."""
    loaded = {
        n.get("node_id"): {m.get("name") for m in (n.get("ollama") or {}).get("models_loaded", [])}
        for n in status.get("nodes", [])
    }
    return all(set(models) <= loaded.get(i, set()) for i in ids)


def log_warnings(lines: Sequence[str]) -> dict[str, int]:
    """herd's JSONL log records at WARNING or above, counted by logger and message (numbers
    folded, so one kind of warning counts as one)."""
    counts: Counter[str] = Counter()
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            msg = re.sub(r"\d+(\.\d+)?", "N", str(rec.get("msg", "")))[:160]
            counts[f"herd {rec.get('logger', '?')}: {msg}"] += 1
    return dict(counts)


async def run_child(args: argparse.Namespace) -> RunResult:
    """One workload through herd, inside the namespace."""
    workload = WORKLOADS[args.workload]
    knobs = QUICK if args.quick else Knobs()
    rng = random.Random(f"{args.seed}/{workload.name}")  # the same requests as every policy's
    fleet = HerdFleet(
        Path(args.venv), args.seed, args.time_scale, Path(args.workdir), workload.context_length
    )
    try:
        await fleet.start()
        if workload.preload:
            await load_directly([s.url for s in fleet.sims], workload.preload)
            await fleet.wait_loaded(workload.preload)
        before = counters(fleet.sims)
        log_at = fleet.router_log.stat().st_size if fleet.router_log.exists() else 0
        cpu0, herd0 = time.process_time(), fleet.cpu_seconds()
        clients = Clients("127.0.0.1", fleet.port, {}, args.time_scale)
        samples, wall = await workload.drive(clients, workload.plan(rng, knobs), knobs, args.cap)
        cpu1, herd1 = time.process_time(), fleet.cpu_seconds()
        after = counters(fleet.sims)
        warnings: dict[str, int] = {}
        with contextlib.suppress(OSError):
            with open(fleet.router_log, errors="replace") as f:  # noqa: ASYNC230 - a local file, read once
                f.seek(log_at)
                warnings = log_warnings(f.read().splitlines())
    finally:
        await fleet.stop()
    return run_result(
        workload.name,
        POLICY,
        samples,
        wall,
        args.time_scale,
        node_ids(),
        before,
        after,
        cpu_self_pct=(cpu1 - cpu0) / wall * 100 if wall > 0 else 0.0,
        cpu_peer_pct=(herd1 - herd0) / wall * 100 if wall > 0 else 0.0,
        warnings=warnings,
    )


async def child_main(args: argparse.Namespace) -> int:
    # the parent stops this process with SIGTERM: stop the fleet on the way out
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        result = await run_child(args)
    except RuntimeError as e:
        print(f"herd run failed: {one_line(str(e))}", file=sys.stderr, flush=True)
        print(e, file=sys.stderr, flush=True)  # whole, for the log
        return 1
    (Path(args.workdir) / "result.json").write_bytes(result_to_json(result))
    return 0


def one_line(message: str) -> str:
    """A message's first line and, when it has more (a log's tail), its last one."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}"


def child_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.routing.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=list(WORKLOADS))
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--time-scale", type=float, required=True)
    p.add_argument("--cap", type=float, required=True)
    p.add_argument("--venv", required=True, help="herd's virtualenv")
    p.add_argument("--workdir", required=True, help="logs, herd's homes and result.json go here")
    p.add_argument("--quick", action="store_true")
    return p


def child_argv(
    workload: str, *, seed: int, time_scale: float, cap: float, venv: Path, workdir: Path, quick: bool
) -> list[str]:
    """The child's command line (run inside the namespace)."""
    argv = [sys.executable, "-m", "bench.routing.peer", "--workload", workload, "--seed", str(seed)]
    argv += [
        "--time-scale",
        repr(time_scale),
        "--cap",
        repr(cap),
        "--venv",
        str(venv),
        "--workdir",
        str(workdir),
    ]
    return argv + (["--quick"] if quick else [])


# -- the parent: the benchmark's side ----------------------------------------------------------------
async def run_herd(
    workload: str,
    *,
    seed: int,
    time_scale: float,
    cap: float,
    quick: bool,
    venv: Path,
    keep_logs: bool = False,
) -> RunResult:
    """``workload`` through herd in a namespace of its own; raises `PeerFailed` (or
    `NamespaceUnavailable`) with one line that says why. The namespace and every process in it are
    gone when this returns or raises, Ctrl-C included."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-herd-"))
    argv = child_argv(
        workload, seed=seed, time_scale=time_scale, cap=cap, venv=venv, workdir=workdir, quick=quick
    )
    keep = False  # the logs stay for a failed run, or when asked for
    try:
        with Namespace("corral-herd") as ns, open(workdir / "peer.log", "wb") as log:  # noqa: ASYNC230
            proc = await asyncio.create_subprocess_exec(
                *exec_argv(ns.name, argv),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops the child in order
            )
            try:
                async with asyncio.timeout(cap + SETUP_S):
                    await proc.wait()
            except TimeoutError:
                raise PeerFailed(
                    f"the herd run did not end within {cap + SETUP_S:.0f}s (logs: {workdir})"
                ) from None
            finally:
                if proc.returncode is None:
                    proc.terminate()  # the child stops herd's processes and the simulators
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), STOP_S * 2)
        if proc.returncode is None:  # killed with the namespace: reap it
            await proc.wait()
        result_file = workdir / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = (workdir / "peer.log").read_text(errors="replace").strip().splitlines()
            why = next(
                (line for line in reversed(tail) if line.startswith("herd run failed")),
                tail[-1] if tail else "",
            )
            raise PeerFailed(f"{why or f'exit status {proc.returncode}'} (logs: {workdir})")
        if keep_logs:
            keep = True
            print(f"    herd's logs: {workdir}", flush=True)
        return result_from_json(result_file.read_bytes())
    except PeerFailed:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run(child_main(child_parser().parse_args())))
