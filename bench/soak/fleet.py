"""The fleet under soak: every Corral process its own OS process, so each one's RSS can be read
from ``/proc/<pid>/status``, and agents can be SIGKILLed and started again with the same id.

Each process runs in its own session and process group, with its stdout and stderr appended to
``<log dir>/<name>.log`` (a restarted agent appends to its own log, after a marker line), and
asks Linux to SIGTERM it should this benchmark die without stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Child, free_port, process_tree, wait_port

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1

# Simulated time runs 1/time_scale times faster than the wall clock; models stay loaded for the
# whole run (the kills are the perturbation, not keep_alive expiries); replies of 100–400 tokens
# before a request's num_predict caps them.
SIM_TOML = """\
# bench.soak: one 24 GB NVIDIA card, four slots per model, models kept loaded
num_parallel = {parallel}
keep_alive = "24h"
reply_tokens = [100, 400]
gpus = [{{ name = "soak", vram_gb = 24 }}]
"""


def _die_with_parent() -> None:
    """In the child before exec: no signal blocked (the benchmark blocks its stop signals for its
    own signal thread), and a SIGTERM when the benchmark dies (Linux only)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Proc(Child):
    """A `Child` whose log is appended to (a restart keeps the earlier run's lines) and which
    dies with the benchmark."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(name, argv, log_path=log_path, env=env)
        self.starts = 0
        self.killed = False  # this benchmark SIGKILLed the current run

    async def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local log file, opened per start
            if self.starts > 1:
                log.write(
                    f"\n--- bench.soak: start #{self.starts} at {time.strftime('%H:%M:%S')} ---\n".encode()
                )
                log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        self.killed = False  # only now: until the new run exists, the killed one is what `exited` sees

    async def kill(self) -> None:
        """SIGKILL its whole process group, as a crash of the machine's process would, and reap it."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@dataclass
class Ports:
    nats: int
    gateway: int
    sims: list[int]


class Fleet:
    """``corral nats``, registry, aggregator, gateway and N agents each beside its own simulator.

    ``async with Fleet(...) as fleet``: started on entry, every process stopped on exit, errors and
    cancellation included (a process that ignores SIGTERM is killed with its process group)."""

    def __init__(
        self,
        *,
        workdir: Path,
        log_dir: Path,
        agents: int,
        parallel: int,
        time_scale: float,
        heartbeat_s: float,
        log_level: str,
        rebalance_s: float | None = None,
    ) -> None:
        self.workdir = workdir
        self.log_dir = log_dir
        self.n_agents = agents
        self.parallel = parallel
        self.time_scale = time_scale
        self.heartbeat_s = heartbeat_s
        self.log_level = log_level
        self.rebalance_s = rebalance_s  # the registry's CORRAL_REBALANCE_S; None: its default
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.procs: dict[str, Proc] = {}  # in start order
        self.ports = Ports(nats=free_port(), gateway=free_port(), sims=[free_port() for _ in range(agents)])
        self.nats_server_pid: int | None = None  # the nats-server binary, a child of `corral nats`

    # -- names ---------------------------------------------------------------------------------------
    @property
    def nats_url(self) -> str:
        return f"nats://{HOST}:{self.ports.nats}"

    @property
    def agent_names(self) -> list[str]:
        return [f"agent-{i}" for i in range(self.n_agents)]

    @staticmethod
    def agent_id(i: int) -> str:
        return f"soak-{i}"

    def _proc(self, name: str, module: str, args: list[str]) -> Proc:
        argv = [sys.executable, "-m", module, *args, "--log-level", self.log_level]
        p = Proc(name, argv, log_path=self.log_dir / f"{name}.log", env=self.env)
        self.procs[name] = p
        return p

    # -- start and stop ------------------------------------------------------------------------------
    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.stop())

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sim_toml = self.workdir / "sim.toml"
        sim_toml.write_text(SIM_TOML.format(parallel=self.parallel))
        nats = self._proc(
            "nats",
            "corral.cli",
            ["nats", "--port", str(self.ports.nats), "--store-dir", str(self.workdir / "nats")],
        )
        sims = [
            self._proc(
                f"sim-{i}",
                "corral.simulator",
                ["--config", str(sim_toml), "--port", str(port), "--time-scale", str(self.time_scale)],
            )
            for i, port in enumerate(self.ports.sims)
        ]
        await asyncio.gather(nats.start(), *(s.start() for s in sims))
        await wait_port(self.ports.nats, nats, 30)
        self.nats_server_pid = self._find_nats_server(nats.pid)
        await asyncio.gather(*(wait_port(p, s, 30) for p, s in zip(self.ports.sims, sims, strict=True)))

        nats_arg = ["--nats-url", self.nats_url]
        rebalance = [] if self.rebalance_s is None else ["--rebalance-s", str(self.rebalance_s)]
        registry = self._proc("registry", "corral.registry", [*nats_arg, *rebalance])
        aggregator = self._proc("aggregator", "corral.aggregator", nats_arg)
        agents = [
            self._proc(
                name,
                "corral.agent",
                [
                    *nats_arg,
                    "--id",
                    self.agent_id(i),
                    "--ollama-url",
                    f"http://{HOST}:{port}",
                    "--vendor",
                    "nvidia",
                    "--vram-gb",
                    "24",
                    "--parallel",
                    str(self.parallel),
                    "--heartbeat-s",
                    str(self.heartbeat_s),
                ],
            )  # fmt: skip
            for i, (name, port) in enumerate(zip(self.agent_names, self.ports.sims, strict=True))
        ]
        gateway = self._proc("gateway", "corral.gateway", [*nats_arg, "--port", str(self.ports.gateway)])
        await asyncio.gather(registry.start(), aggregator.start(), *(a.start() for a in agents))
        await gateway.start()
        await wait_port(self.ports.gateway, gateway, 30)
        await self.wait_agents(set(range(self.n_agents)), timeout=60)

    def _find_nats_server(self, corral_nats_pid: int) -> int | None:
        """The nats-server binary `corral nats` started (its child: found by name, not guessed)."""
        for pid in process_tree(corral_nats_pid)[1:]:
            with contextlib.suppress(OSError):
                if "nats-server" in Path(f"/proc/{pid}/comm").read_text():
                    return pid
        return None

    async def stop(self) -> None:
        """Reverse start order: the gateway, then agents and simulators together, the aggregator,
        the registry, NATS; then a SIGKILL for a nats-server its parent left behind."""
        order = list(reversed(self.procs.values()))
        gateway = [p for p in order if p.name == "gateway"]
        middle = [p for p in order if p.name.startswith(("agent-", "sim-"))]
        rest = [p for p in order if p not in gateway and p not in middle]
        for group in (gateway, middle, *([p] for p in rest)):
            await asyncio.gather(*(p.stop() for p in group), return_exceptions=True)
        pid = self.nats_server_pid
        if pid is not None and _is_nats_server(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # -- the agents' faults --------------------------------------------------------------------------
    async def kill_agent(self, i: int) -> None:
        await self.procs[self.agent_names[i]].kill()

    async def restart_agent(self, i: int) -> None:
        await self.procs[self.agent_names[i]].start()

    def agent_alive(self, i: int) -> bool:
        return self.procs[self.agent_names[i]].alive()

    async def fleet_agents(self, session: aiohttp.ClientSession) -> set[str]:
        """The agent ids the gateway's ``/api/status`` lists as up."""
        url = f"http://{HOST}:{self.ports.gateway}/api/status"
        async with session.get(url) as r:
            body: dict[str, Any] = await r.json()
        return {row["id"] for row in body.get("agents", []) if row.get("status") != "dead"}

    async def wait_agents(self, which: set[int], timeout: float) -> None:
        """Until the gateway lists every agent in ``which`` (bounded); fails early if one exits."""
        want = {self.agent_id(i) for i in which}
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                for i in which:
                    if not self.agent_alive(i):
                        raise RuntimeError(
                            f"{self.agent_names[i]} exited during start:\n{self.procs[self.agent_names[i]].log_tail()}"
                        )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    seen = await self.fleet_agents(session)
                    if want <= seen:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(
            f"the gateway lists {sorted(seen)} after {timeout:.0f}s, not all of {sorted(want)}"
        )

    # -- what is sampled -----------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        """Process name → pid of every process running now; ``nats-server`` is the binary."""
        out = {name: p.pid for name, p in self.procs.items() if p.alive()}
        if self.nats_server_pid is not None and _is_nats_server(self.nats_server_pid):
            out["nats-server"] = self.nats_server_pid
        return out

    def exited(self) -> dict[str, int]:
        """Processes that ended by themselves (not an agent this benchmark killed): name → status."""
        return {
            name: p.proc.returncode
            for name, p in self.procs.items()
            if p.proc is not None and p.proc.returncode is not None and not p.killed
        }


def _is_nats_server(pid: int) -> bool:
    try:
        return "nats-server" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False
