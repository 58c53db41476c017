"""``deploy/nats.conf`` as the real nats-server reads it: valid, broken copies rejected, and a server
booted on it has JetStream, an 8 MB payload limit and a health endpoint."""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.request
from pathlib import Path

import nats
import pytest
from corral.runtime.natsserver import find_binary, free_port

NATS_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nats.conf"

pytestmark = pytest.mark.integration


# -- nats.conf --------------------------------------------------------------------------------
def nats_conf_copy(tmp_path: Path, **replace: str) -> Path:
    """deploy/nats.conf with its store dir under tmp_path and top-level settings replaced."""
    text = NATS_CONF.read_text()
    text, n = re.subn(r'store_dir:\s*"[^"]*"', f'store_dir: "{tmp_path / "js"}"', text)
    assert n == 1, "nats.conf should set store_dir once"
    for key, value in replace.items():
        text, n = re.subn(rf"(?m)^{key}:.*$", f"{key}: {value}", text)
        assert n == 1, f"nats.conf should set {key} once"
    path = tmp_path / "nats.conf"
    path.write_text(text)
    return path


def nats_config_test(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False
    )


def test_nats_server_accepts_nats_conf(tmp_path: Path) -> None:
    result = nats_config_test(nats_conf_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_nats_server_config_test_can_fail(tmp_path: Path) -> None:
    result = nats_config_test(nats_conf_copy(tmp_path, max_pending="not-a-size"))
    assert result.returncode != 0, "nats-server -t accepted a broken config"


async def test_nats_conf_boots_with_jetstream_and_8mb_payload(tmp_path: Path) -> None:
    """Start nats-server on deploy/nats.conf (ports and store moved) and use it."""
    port, http_port = free_port(), free_port()
    conf = nats_conf_copy(tmp_path, port=str(port), http_port=str(http_port))
    proc = await asyncio.create_subprocess_exec(
        find_binary(), "-a", "127.0.0.1", "-c", str(conf), stderr=asyncio.subprocess.PIPE
    )
    stderr = proc.stderr
    assert stderr is not None
    try:
        log: list[str] = []

        async def ready() -> None:
            async for raw in stderr:
                log.append(raw.decode(errors="replace"))
                if "Server is ready" in log[-1]:
                    return
            raise AssertionError("nats-server exited:\n" + "".join(log))

        await asyncio.wait_for(ready(), 15)
        assert any("Starting JetStream" in line for line in log)
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        try:
            assert nc.max_payload == 8 * 1024 * 1024
            info = await nc.jetstream().account_info()
            assert info.limits is not None
        finally:
            await nc.drain()
        url = f"http://127.0.0.1:{http_port}/healthz?js-enabled-only=true"
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        await proc.wait()
