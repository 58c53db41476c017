"""`NatsServer.start` tells a server that came up from one that failed by the server's own words
(its "Server is ready" line), not by whether its exit was already noticed: a nats-server that cannot
listen prints its JetStream banner, closes its log and exits, and the exit can be seen after the
log's end."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from corral.runtime import natsserver
from corral.runtime.natsserver import NatsPortTaken, NatsServer, NatsServerError, free_port

_BANNER = "[1] [INF] Starting JetStream\\n[1] [INF] Took 1ms to start JetStream\\n"


def _stand_in(tmp_path: Path, body: str) -> str:
    """An executable standing in for nats-server: prints the banner, then does ``body``."""
    exe = tmp_path / "nats-server"
    exe.write_text(f'#!/bin/sh\nprintf "{_BANNER}" >&2\n{body}\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


@pytest.mark.parametrize(
    ("body", "error", "says"),
    [
        (  # its log closes, then it lingers before exiting: the exit comes after the log's end
            'printf "[1] [FTL] Error listening on port: 127.0.0.1:4222, \\"bind: address already in '
            'use\\"\\n" >&2\nexec 2>&-\nsleep 1\nexit 1',
            NatsPortTaken,
            "is taken",
        ),
        ('printf "[1] [FTL] cannot open the store\\n" >&2\nexit 1', NatsServerError, "cannot open the store"),
        # no "ready", yet still running with its log closed: given up on, not taken for a server
        ("exec 2>&-\nsleep 1\nexit 0", NatsServerError, "exited during start"),
    ],
    ids=["port-taken-exit-after-log", "fatal-error", "log-closed-without-ready"],
)
async def test_a_server_that_never_said_ready_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, error: type[Exception], says: str
) -> None:
    monkeypatch.setattr(natsserver, "find_binary", lambda: _stand_in(tmp_path, body))
    server = NatsServer(store_dir=tmp_path / "store", ready_timeout=5.0)
    with pytest.raises(error, match=says):
        await server.start()
    assert server.pid is None  # nothing left running
    await server.stop()


async def test_the_ready_line_starts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = 'printf "[1] [INF] Server is ready\\n" >&2\nexec 2>&-\nexec sleep 5'
    monkeypatch.setattr(natsserver, "find_binary", lambda: _stand_in(tmp_path, body))
    server = NatsServer(store_dir=tmp_path / "store", ready_timeout=5.0)
    await server.start()
    assert server.pid is not None
    await server.stop()
    assert server.pid is None


async def test_it_says_the_store_its_config_file_chose(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`corral nats --config FILE`: the file's store_dir is the store, and the ready line names it."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp_path / "kept"}" }}\n')
    caplog.set_level("INFO", logger=natsserver.__name__)
    async with NatsServer(port=port, config_file=conf, store_dir=tmp_path / "unused"):
        pass
    ready = [r.getMessage() for r in caplog.records if "nats-server ready" in r.getMessage()]
    assert ready and f"(JetStream store {tmp_path / 'kept' / 'jetstream'})" in ready[0], ready
