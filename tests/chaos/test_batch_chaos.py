"""A batch survives its fleet failing under it: gateways, agents and the registry run as real
processes and are SIGKILLed in the middle of a batch — one gateway (another finishes the batch), an
agent, the registry, every Corral process at once (then started again), and nats-server itself —
and every time the batch completes with each custom_id exactly once in its output and error files.

The simulated servers run in the test (they stand for the GPUs, which outlive Corral's processes);
their generation is slowed so that the batch is mid-flight when the fault comes."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import openai
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer, free_port
from corral.simulator import SimServer
from corral.up import default_sims
from nats.js import JetStreamContext

from tests.integration.batch_helpers import exactly_once, jsonl, outcome, request, submit, wait_until
from tests.integration.cli_helpers import without_corral_settings
from tests.integration.waits import Changes, until

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(180)]

LINES = 40
READY_TIMEOUT_S = 30.0
BATCH_TIMEOUT_S = 120.0  # a killed gateway's lines come back after the consumer's ack wait (10 s)


class Proc:
    """One ``corral`` service as a real process; its log goes to a file, lines read as they come."""

    def __init__(self, log: Path, *args: str) -> None:
        self.args = args
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._seen = Changes()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Proc:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.cli",
            *self.args,
            env=without_corral_settings(),
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log.open("a") as f:
            while line := (await self.proc.stderr.readline()).decode():
                f.write(line)
                self.lines.append(line)
                self._seen.set()

    async def wait_for(self, text: str, timeout: float = READY_TIMEOUT_S) -> None:
        def logged() -> bool:
            if any(text in line for line in self.lines):
                return True
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"{self.args[0]} exited:\n{''.join(self.lines[-30:])}")
            return False

        await until(logged, self._seen.wait, timeout=timeout, what=f"{self.args[0]} logs {text!r}")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)


class Fleet:
    """Processes on one NATS: gateways, agents (one per simulated server), a registry."""

    def __init__(self, server: NatsServer, root: str, logs: Path, sims: list[SimServer]) -> None:
        self.server = server
        self.root = root
        self.logs = logs
        self.sims = sims
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}

    def common(self) -> list[str]:
        return ["--nats", self.server.url, "--root", self.root]

    async def _start(self, name: str, *args: str) -> Proc:
        p = await Proc(self.logs / f"{name}.log", *args, *self.common()).start()
        self.procs.append(p)
        return p

    async def gateway(self, name: str) -> Proc:
        port = self.ports.setdefault(name, free_port())
        p = await self._start(name, "gateway", "--port", str(port), "--gateway-id", name)
        await p.wait_for("gateway listening on")
        return p

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    async def agent(self, i: int) -> Proc:
        sim = self.sims[i]
        return await self._start(
            f"agent{i}",
            "agent",
            "--ollama",
            sim.url,
            "--id",
            f"a{i}",
            "--parallel",
            "2",
            "--heartbeat-s",
            "0.5",
        )

    async def registry(self) -> Proc:
        return await self._start("registry", "registry", "--dead-after-s", "2")

    async def everything(self) -> None:
        await self.registry()
        for i in range(len(self.sims)):
            await self.agent(i)
        await self.gateway("g1")
        await self.gateway("g2")

    async def stop(self) -> None:
        for p in self.procs:
            await p.kill()


@pytest.fixture
async def fleet(server: NatsServer, root: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    sims = [SimServer(cfg, host="127.0.0.1", port=0) for cfg in default_sims(2, time_scale=0.3)]
    for s in sims:
        await s.start()
    f = Fleet(server, root, tmp_path, sims)
    try:
        await f.everything()
        yield f
    finally:
        await f.stop()
        for s in sims:
            await s.stop()


async def results_at_least(
    js: JetStreamContext, root: str, batch_id: str, n: int, timeout: float = 60
) -> None:
    """Wait until ``n`` lines of the batch have their result (a watch on the results bucket)."""
    kv = await js.key_value(Subjects(root).batch_results_bucket)
    watcher = await kv.watch(f"{batch_id}.*")
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is not None and entry.value:
                    seen.add(entry.key)
                    if len(seen) >= n:
                        return
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


async def run_through(fleet: Fleet, fault: object) -> None:
    """Submit a batch through g1 (which makes the stores, so its runner starts on the batch at
    once; g2's finds them on its next sweep), let a few lines finish, apply ``fault``, and follow
    the batch through g2 to its end."""
    lines = [request(i) for i in range(LINES)]
    for line in lines:
        line["body"]["max_tokens"] = 30
    nc = await nats.connect(fleet.server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        async with (
            openai.AsyncOpenAI(base_url=fleet.url("g1") + "/v1", api_key="x", max_retries=0) as first,
            openai.AsyncOpenAI(base_url=fleet.url("g2") + "/v1", api_key="x", max_retries=5) as c,
        ):
            b = await submit(first, jsonl(lines))
            await results_at_least(js, fleet.root, b.id, 3)
            await fault()  # type: ignore[operator]
            done = await wait_until(c, js, fleet.root, b.id, timeout=BATCH_TIMEOUT_S)
            assert done.status == "completed", done
            out, err = await outcome(c, done)
        exactly_once(out, err, [x["custom_id"] for x in lines])
        assert len(out) == LINES, err[:3]  # every failure was transient: retried until it ran
    finally:
        await nc.close()


async def test_a_gateway_killed_mid_batch_leaves_its_lines_to_another(fleet: Fleet) -> None:
    g1 = next(p for p in fleet.procs if "g1" in p.args)

    async def fault() -> None:
        await g1.kill()

    await run_through(fleet, fault)


async def test_an_agent_killed_mid_batch(fleet: Fleet) -> None:
    agent = next(p for p in fleet.procs if "agent" in p.args)

    async def fault() -> None:
        await agent.kill()

    await run_through(fleet, fault)


async def test_the_registry_killed_mid_batch(fleet: Fleet) -> None:
    registry = next(p for p in fleet.procs if "registry" in p.args)

    async def fault() -> None:
        await registry.kill()

    await run_through(fleet, fault)


async def test_every_corral_process_and_nats_restarted_mid_batch(fleet: Fleet) -> None:
    """Nothing of a batch lives only in a process: all of them die at once, nats-server restarts
    on its store, and the restarted fleet finishes the batch."""

    async def fault() -> None:
        for p in list(fleet.procs):
            await p.kill()
        fleet.procs.clear()
        await fleet.server.kill()
        await fleet.server.start()
        await fleet.everything()

    await run_through(fleet, fault)
