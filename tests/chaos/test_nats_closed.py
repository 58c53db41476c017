"""A NATS connection closed for good ends the process non-zero, so its supervisor restarts it.

The server closes a connection for good when it no longer authorizes it: the test starts a server
without authorization, starts a service as a real process, then turns authorization on and reloads
the server (SIGHUP). nats-py does not reconnect after "Authorization Violation".
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from corral.runtime.natsserver import NatsServer, free_port

pytestmark = pytest.mark.chaos

EXIT_WITHIN_S = 20.0


def _config(path: Path, port: int, store: Path, *, auth: bool) -> Path:
    text = f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{store}" }}\n'
    if auth:
        text += 'authorization { user: "someone", password: "else" }\n'
    path.write_text(text)
    return path


async def _spawn(service: str, nats_url: str, root: str, *extra: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "CORRAL_LOG_LEVEL": "INFO", "CORRAL_HEARTBEAT_S": "0.5"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"corral.{service}",
        "--nats",
        nats_url,
        "--root",
        root,
        *extra,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )


async def _wait_line(proc: asyncio.subprocess.Process, text: str, timeout: float = 20.0) -> None:
    assert proc.stderr is not None
    async with asyncio.timeout(timeout):
        async for raw in proc.stderr:
            if text in raw.decode(errors="replace"):
                return
    raise AssertionError(f"the process ended without logging {text!r}")


async def _drain_stderr(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    async for _ in proc.stderr:
        pass


@pytest.mark.parametrize(
    ("service", "ready", "extra"),
    [
        ("registry", "registry ready", ()),
        ("aggregator", "aggregator ready", ()),
        ("agent", "serving", ("--id", "a1", "--ollama", "http://127.0.0.1:9", "--vendor", "cpu")),
        ("gateway", "gateway listening", ("--port", "0")),
    ],
)
async def test_a_connection_closed_for_good_exits_non_zero(
    tmp_path: Path, root: str, service: str, ready: str, extra: tuple[str, ...]
) -> None:
    port = free_port()
    conf = _config(tmp_path / "nats.conf", port, tmp_path / "js", auth=False)
    server = NatsServer(port=port, config_file=conf)
    await server.start()
    proc = await _spawn(service, server.url, root, *extra)
    try:
        await _wait_line(proc, ready)
        _config(conf, port, tmp_path / "js", auth=True)
        server.reload()
        drain = asyncio.create_task(_drain_stderr(proc))
        rc = await asyncio.wait_for(proc.wait(), EXIT_WITHIN_S)
        await drain
        assert rc not in (0, None)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.stop()
