"""ollama-herd as a peer router: its pinned release installed into a virtualenv of its own, and the
environment and command line of its router (``herd``) and of one node agent (``herd-node``) per
simulated server.

What is configured, and why (every setting is herd's own, read by its pydantic settings from the
environment: ``FLEET_*`` for the router, ``FLEET_NODE_*`` for a node):

- telemetry off on both sides (``FLEET_TELEMETRY``, ``FLEET_NODE_TELEMETRY``); the processes run in
  a network namespace with only loopback anyway, and each in a fresh ``HOME`` (herd keeps its
  traces, latency history and pins under ``~/.fleet-manager``), so no run learns from another;
- the answer is the model asked for: auto-pull off (``FLEET_AUTO_PULL``), model substitution off
  (``FLEET_VRAM_FALLBACK``: no other loaded model instead of a cold load; ``FLEET_CONTEXT_PROTECTION``
  ``warn``: the default ``strip`` may switch a request to a bigger loaded model when it asks for more
  context than the loaded runner has);
- the workload is the same: herd multiplies ``num_predict`` of a thinking model by 4 (at least 1024)
  by default; ``FLEET_THINKING_OVERHEAD=1`` and ``FLEET_THINKING_MIN_PREDICT=0`` leave it as sent,
  so every router generates the same tokens;
- each node reports its simulator's slots and loaded-model cap as herd reads them from the node's
  environment: ``OLLAMA_NUM_PARALLEL`` (herd's per-node, per-model concurrency) and
  ``OLLAMA_MAX_LOADED_MODELS``;
- logs at WARNING, as Corral's fleet runs (herd writes a DEBUG JSONL file by default: its cost
  would be charged to the router);
- periods follow the simulated clock as Corral's do (`scaled`): the node heartbeat and poll, the
  router's heartbeat check and its rebalancer (queue-driven pre-warm); herd's timeouts (heartbeat
  stale/offline, stale requests) stay at their wall-clock defaults.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from corral.simulator import SimConfig

from bench.routing.fleet import MIN_PERIOD_S, Machine

HERD_VERSION = "0.11.4"
REQUIREMENT = f"ollama-herd=={HERD_VERSION}"
# herd's defaults for the settings that are periods (seconds), scaled to the simulated clock
ROUTER_PERIODS = {"FLEET_HEARTBEAT_INTERVAL": 5.0, "FLEET_REBALANCE_INTERVAL": 5.0}
NODE_PERIODS = {"FLEET_NODE_HEARTBEAT_INTERVAL": 5.0, "FLEET_NODE_POLL_INTERVAL": 5.0}
ROUTER_SETTINGS = {
    "FLEET_TELEMETRY": "false",
    "FLEET_NODE_TELEMETRY": "false",  # the alias herd documents for the router's opt-out too
    "FLEET_AUTO_PULL": "false",
    "FLEET_VRAM_FALLBACK": "false",
    "FLEET_CONTEXT_PROTECTION": "warn",
    "FLEET_THINKING_OVERHEAD": "1",
    "FLEET_THINKING_MIN_PREDICT": "0",
}
NODE_SETTINGS = {"FLEET_NODE_TELEMETRY": "false"}
LOG_LEVEL = "warning"  # the command line's, for the console and uvicorn
INSTALL_TIMEOUT_S = 600.0
MARKER = "corral-bench-installed"  # written last: its presence means the install completed


class HerdUnavailable(RuntimeError):
    """herd cannot be installed or run here; the message says why, in one line."""


def default_venv() -> Path:
    return Path.home() / ".cache" / "corral-bench" / f"ollama-herd-{HERD_VERSION}"


def scaled(periods: dict[str, float], time_scale: float) -> dict[str, str]:
    """``{name: default × time_scale}`` (at least `MIN_PERIOD_S`), as environment values."""
    return {k: f"{max(v * time_scale, MIN_PERIOD_S):g}" for k, v in periods.items()}


def base_env(venv: Path, home: Path) -> dict[str, str]:
    """What every herd process gets, and nothing of this process's environment: a fresh ``HOME``,
    herd's virtualenv first on ``PATH``, wide log lines."""
    return {
        "HOME": str(home),
        "PATH": f"{venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "240",  # herd logs through rich, which wraps at 80 columns without a terminal
        # herd's own log files default to DEBUG: warnings only, as Corral's fleet runs
        "FLEET_LOG_LEVEL": "WARNING",
        "FLEET_CONSOLE_LOG_LEVEL": "WARNING",
    }


def router_env(venv: Path, home: Path, time_scale: float) -> dict[str, str]:
    return base_env(venv, home) | ROUTER_SETTINGS | scaled(ROUTER_PERIODS, time_scale)


def node_env(venv: Path, home: Path, machine: Machine, sim: SimConfig, time_scale: float) -> dict[str, str]:
    return (
        base_env(venv, home)
        | NODE_SETTINGS
        | scaled(NODE_PERIODS, time_scale)
        | {"OLLAMA_NUM_PARALLEL": str(machine.parallel), "OLLAMA_MAX_LOADED_MODELS": str(sim.max_loaded)}
    )


def router_argv(venv: Path, port: int) -> list[str]:
    return [str(venv / "bin" / "herd"), "--host", "127.0.0.1", "--port", str(port), "--log-level", LOG_LEVEL]


def node_argv(venv: Path, node_id: str, ollama_url: str, router_url: str) -> list[str]:
    return [
        str(venv / "bin" / "herd-node"),
        "--node-id",
        node_id,
        "--ollama-host",
        ollama_url,
        "--router-url",
        router_url,
        "--log-level",
        LOG_LEVEL,
    ]


class Installed(NamedTuple):
    venv: Path
    fresh: bool  # installed by this call (not found ready)
    freeze: list[str]  # the virtualenv's packages, ``name==version``


def installed(venv: Path) -> bool:
    """Whether ``venv`` holds a completed install of `REQUIREMENT`."""
    marker = venv / MARKER
    return (
        (venv / "bin" / "herd").is_file() and marker.is_file() and marker.read_text().strip() == REQUIREMENT
    )


def freeze(venv: Path) -> list[str]:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.split()


def install_commands(python: str, target: Path) -> list[list[str]]:
    """Create a virtualenv at ``target`` with ``python`` and install `REQUIREMENT` into it."""
    pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    return [[python, "-m", "venv", str(target)], [*pip, "install", REQUIREMENT]]


def ensure_installed(venv: Path | None = None) -> Installed:
    """herd's virtualenv, created and installed once; raises `HerdUnavailable`. The virtualenv's
    scripts name their interpreter by path, so it is built where it stays: a failed or interrupted
    install is removed, and `MARKER` is written only when it completed."""
    venv = venv or default_venv()
    if installed(venv):
        return Installed(venv, False, freeze(venv))
    shutil.rmtree(venv, ignore_errors=True)  # an install that never completed
    venv.parent.mkdir(parents=True, exist_ok=True)
    try:
        for argv in install_commands(sys.executable, venv):
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise HerdUnavailable(f"cannot install {REQUIREMENT} into {venv}: {e}") from e
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                why = lines[-1] if lines else f"exit status {done.returncode}"
                raise HerdUnavailable(f"cannot install {REQUIREMENT} into {venv}: {why}")
        (venv / MARKER).write_text(REQUIREMENT + "\n")
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    return Installed(venv, True, freeze(venv))
