"""An agent asked to stop while its NATS is away stops within its drain grace, and its reconnect
attempts back off with a rate-limited log line instead of one every half second."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
from corral.runtime.natsserver import NatsServer

pytestmark = pytest.mark.chaos

DRAIN_GRACE_S = 3.0
OFFLINE_S = 3.0  # how long the agent runs without NATS before it is stopped


async def test_sigterm_without_nats_exits_within_the_drain_grace(root: str) -> None:
    server = NatsServer()
    await server.start()
    env = {
        **os.environ,
        "CORRAL_LOG_LEVEL": "INFO",
        "CORRAL_HEARTBEAT_S": "0.5",
        "CORRAL_DRAIN_GRACE_S": str(DRAIN_GRACE_S),
    }
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.agent", "--nats", server.url, "--root", root,
        "--id", "offline", "--ollama", "http://127.0.0.1:9", "--vendor", "cpu",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    serving = asyncio.Event()
    disconnected = asyncio.Event()

    async def read() -> None:
        assert agent.stderr is not None
        async for raw in agent.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "serving" in line:
                serving.set()
            if "disconnected from NATS" in line:
                disconnected.set()

    reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(serving.wait(), 20)
        await server.kill()
        await asyncio.wait_for(disconnected.wait(), 10)
        # it keeps trying for a while; each try is refused at once
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(agent.wait(), OFFLINE_S)
        asked = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.wait_for(agent.wait(), DRAIN_GRACE_S + 10)
        except TimeoutError:
            raise AssertionError("the agent did not stop:\n" + "".join(lines[-30:])) from None
        took = time.monotonic() - asked
        await reader
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        await server.stop()
    assert rc == 0, "".join(lines[-30:])
    assert took < DRAIN_GRACE_S, f"stop took {took:.1f}s"
    errors = [line for line in lines if "NATS error" in line]
    assert 1 <= len(errors) <= 2, errors  # rate-limited: not one per attempt
