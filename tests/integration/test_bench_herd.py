"""The routing benchmark's herd peer for real: one quick workload through ollama-herd in a network
namespace, and nothing left behind. Skipped where herd's virtualenv was never installed (the
benchmark installs it on first use; no test downloads it) or namespaces cannot be made."""

import subprocess

import pytest

from bench.routing.herd import default_venv, installed
from bench.routing.netns import unavailable
from bench.routing.peer import node_ids, run_herd
from bench.routing.workloads import QUICK

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _namespaces() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


@pytest.mark.timeout(240)
async def test_a_quick_burst_through_herd_leaves_nothing_behind() -> None:
    if unavailable():
        pytest.skip(unavailable())
    if not installed(default_venv()):
        pytest.skip(
            f"no herd virtualenv at {default_venv()} (python -m bench.routing --policies herd makes it)"
        )
    before = _namespaces()
    r = await run_herd("burst", seed=1, time_scale=0.2, cap=60.0, quick=True, venv=default_venv())
    assert r.policy == "herd" and len(r.samples) == QUICK.burst
    assert list(r.agents) == node_ids()
    assert r.errors == 0, r.summary()["error_kinds"]
    assert r.fleet["loads"] >= 1  # the burst's model was loaded somewhere, as the simulators count it
    # every request reached a simulator (herd may add its own, e.g. a pre-warm load)
    assert sum(a["requests"] for a in r.agents.values()) >= QUICK.burst
    assert _namespaces() == before
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10, check=True)
    assert str(default_venv()) not in ps.stdout
