"""`corral agent --spawn`: one `ollama serve` per GPU, each seeing only its GPU on its own port, an
agent beside each; a killed Ollama is restarted (with a growing backoff) and its agent comes back.
The `ollama` on PATH is a stand-in that records its environment and runs the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from corral.runtime.natsserver import NatsServer

from tests.integration.agents_kv import AgentsWatch

pytestmark = pytest.mark.integration

RECORDED = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OLLAMA_HOST", "OLLAMA_NUM_PARALLEL",
            "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_MODELS")  # fmt: skip

STAND_IN = """#!{python}
import json, os, sys
record = {{name: os.environ.get(name) for name in {recorded!r}}}
record |= {{"pid": os.getpid(), "argv": sys.argv[1:]}}
path = os.path.join({folder!r}, "gpu%s-%d.json" % (os.environ["CUDA_VISIBLE_DEVICES"], os.getpid()))
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(path + ".tmp", path)
host, _, port = os.environ["OLLAMA_HOST"].rpartition(":")
os.execv(sys.executable, [sys.executable, "-m", "corral.simulator", "--host", host, "--port", port,
         "--vendor", "nvidia", "--num-parallel", os.environ["OLLAMA_NUM_PARALLEL"], "--time-scale", "0"])
"""


def records(folder: Path, gpu: int) -> list[dict[str, object]]:
    """What each start of GPU ``gpu``'s stand-in saw, oldest first."""
    found = [json.loads(p.read_text()) for p in folder.glob(f"gpu{gpu}-*.json")]
    return sorted(found, key=lambda r: os.stat(folder / f"gpu{gpu}-{r['pid']}.json").st_mtime_ns)


def back(history: list[tuple[str, str]], times: int) -> bool:
    """gpu1's agent left ``times`` times and joined again after the last of them."""
    left = [i for i, event in enumerate(history) if event == ("box-gpu1", "del")]
    return len(left) >= times and ("box-gpu1", "put") in history[left[times - 1] + 1 :]


async def test_one_ollama_and_agent_per_gpu_restarted_when_killed(
    nats_server: NatsServer, root: str, tmp_path: Path
) -> None:
    bin_dir, models = tmp_path / "bin", tmp_path / "models"
    bin_dir.mkdir()
    ollama = bin_dir / "ollama"
    ollama.write_text(STAND_IN.format(python=sys.executable, recorded=RECORDED, folder=str(tmp_path)))
    ollama.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CORRAL_NATS_URL": nats_server.url,
        "CORRAL_ROOT": root,
        "CORRAL_ADVERTISE_HOST": "box",
        "CORRAL_DRAIN_GRACE_S": "5",
    }
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.agent", "--spawn", "--gpus", "2", "--vendor", "nvidia",
        "--vram-gb", "16", "--spawn-port", "0", "--parallel", "3", "--max-loaded-models", "2",
        "--models-dir", str(models), env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output: list[str] = []
    restarts: asyncio.Queue[str] = asyncio.Queue()

    async def read() -> None:
        assert agent.stderr is not None
        while raw := await agent.stderr.readline():
            line = raw.decode(errors="replace")
            output.append(line)
            if "gpu1: ollama serve exited" in line:
                restarts.put_nowait(line)

    reader = asyncio.create_task(read())
    try:
        async with AgentsWatch(nats_server.url, root) as fleet:
            await fleet.until("an agent per GPU", lambda f: {"box-gpu0", "box-gpu1"} <= set(f), 30)
            first = {gpu: records(tmp_path, gpu) for gpu in (0, 1)}
            assert [len(r) for r in first.values()] == [1, 1]
            ports = set()
            for gpu, (seen,) in first.items():
                state = fleet.agents[f"box-gpu{gpu}"]
                host = str(seen["OLLAMA_HOST"])
                assert seen["argv"] == ["serve"]
                assert (seen["CUDA_VISIBLE_DEVICES"], seen["CUDA_DEVICE_ORDER"]) == (str(gpu), "PCI_BUS_ID")
                assert (seen["OLLAMA_NUM_PARALLEL"], seen["OLLAMA_MAX_LOADED_MODELS"]) == ("3", "2")
                assert seen["OLLAMA_MODELS"] == str(models)  # one directory for all
                assert state.ollama_url == f"http://{host}" and state.parallel == 3
                assert [g.index for g in state.gpus] == [gpu] and state.ollama_version
                ports.add(host.rpartition(":")[2])
            assert len(ports) == 2

            # killed: its agent leaves, it is started again on the same port, its agent is back
            for attempt, backoff in enumerate(("0.1s", "0.2s"), start=1):
                dead = int(str(records(tmp_path, 1)[-1]["pid"]))
                os.kill(dead, signal.SIGKILL)
                line = await asyncio.wait_for(restarts.get(), 10)
                assert f"exited (-9); restarting in {backoff}" in line  # the backoff grows
                await fleet.until("gpu1's agent back", lambda _, n=attempt: back(fleet.history, n), 15)
                assert len(records(tmp_path, 1)) == attempt + 1
                again = records(tmp_path, 1)[-1]
                assert again["pid"] != dead and again["OLLAMA_HOST"] == first[1][0]["OLLAMA_HOST"]
            assert ("box-gpu1", "del") in fleet.history and ("box-gpu0", "del") not in fleet.history
            assert len(records(tmp_path, 0)) == 1  # the other GPU's Ollama ran on untouched

            agent.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.wait(), 30) == 0
            await fleet.until("every agent gone on SIGTERM", lambda f: not f, 5)
        for gpu in (0, 1):
            with pytest.raises(ProcessLookupError):  # no Ollama is left behind
                os.kill(int(str(records(tmp_path, gpu)[-1]["pid"])), 0)
    except BaseException:
        sys.stderr.write("".join(output[-60:]))
        raise
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        await reader
        for gpu in (0, 1):
            for r in records(tmp_path, gpu):
                try:
                    os.kill(int(str(r["pid"])), signal.SIGKILL)
                except ProcessLookupError:
                    pass


async def test_no_ollama_to_spawn_stops_the_agent_with_a_clear_message(tmp_path: Path) -> None:
    """Without `ollama` on PATH each GPU's Ollama would fail to start again and again: the agent
    says so once and stops, before it reaches for NATS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["PATH"] = str(tmp_path)  # an empty folder: nothing to run
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.agent", "--spawn", "--gpus", "1", "--vendor", "nvidia",
        "--vram-gb", "8", "--nats", "nats://127.0.0.1:1", env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(agent.communicate(), 60)
    assert agent.returncode == 1, err
    assert b"--spawn: no `ollama` on PATH to start" in err and b"Traceback" not in err, err
