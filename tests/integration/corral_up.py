"""`corral up` as users run it: a real process, its gateway URL and backends read from what it prints."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.cli_helpers import without_corral_settings

_GATEWAY = re.compile(r"^\s*Gateway\s+(http\S+)\s*$")
_BACKEND = re.compile(r"^\s+(\S+)\s+(nvidia|amd|cpu)\s+(http\S+)\s*(.*)$")


@dataclass
class CorralUp:
    """A running ``corral up``: the gateway's URL and each agent's Ollama URL, as it printed them."""

    url: str = ""
    backends: dict[str, str] = field(default_factory=dict)  # agent id -> its (simulated) Ollama's URL
    remarks: dict[str, str] = field(default_factory=dict)  # agent id -> what follows its URL, if anything
    printed: list[str] = field(default_factory=list)

    def take(self, line: str) -> None:
        """One line of its banner: the gateway's URL, or an agent and its Ollama's URL."""
        self.printed.append(line)
        if m := _BACKEND.match(line):
            self.backends[m.group(1)] = m.group(3)
            if m.group(4):
                self.remarks[m.group(1)] = m.group(4)
        elif m := _GATEWAY.match(line):
            self.url = m.group(1)


@asynccontextmanager
async def corral_up(
    nats_url: str,
    root: str,
    log: Path,
    *,
    sims: int = 2,
    time_scale: float = 0.01,
    timeout: float = 60.0,
    ctrl_c: int = 1,
    env: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> AsyncIterator[CorralUp]:
    """Start ``corral up --sim N --port 0`` on ``nats_url`` (empty: its embedded one) under ``root``,
    with ``env`` beside no other ``CORRAL_*`` variable and ``extra`` arguments, wait for its "Gateway"
    line, and on exit stop it with SIGINT, as Ctrl-C does (``ctrl_c`` times: the later ones once it
    says it is draining, as an impatient user presses it again), expecting a clean drain (exit
    status 0). Its log (stderr) goes to ``log``; a failure to start says what it printed."""
    clean = without_corral_settings(env)
    args = ["--sim", str(sims), "--port", "0", "--time-scale", str(time_scale), *extra]
    args += ["--nats", nats_url] if nats_url else []
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.cli",
            "up",
            *args,
            "--root",
            root,
            env=clean,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
        up = CorralUp()
        try:
            await asyncio.wait_for(_read_banner(proc, up), timeout)
            yield up
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                if ctrl_c > 1:
                    await asyncio.wait_for(_read_until(proc, "draining..."), timeout)
                    for _ in range(ctrl_c - 1):
                        proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.communicate(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
    assert proc.returncode == 0, f"corral up exited {proc.returncode}:\n{log.read_text()[-4000:]}"


async def _read_banner(proc: asyncio.subprocess.Process, up: CorralUp) -> None:
    assert proc.stdout is not None
    while not up.url:
        line = (await proc.stdout.readline()).decode()
        if not line:
            raise RuntimeError("corral up ended before printing its gateway:\n" + "".join(up.printed))
        up.take(line)


async def _read_until(proc: asyncio.subprocess.Process, text: str) -> None:
    assert proc.stdout is not None
    while text not in (line := (await proc.stdout.readline()).decode()):
        if not line:
            raise RuntimeError(f"corral up ended before printing {text!r}")
