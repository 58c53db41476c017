"""The official Ollama JavaScript client (npm `ollama`, pinned in tests/js) against `corral up` as a process.

tests/js/ollama_client.mjs lists, shows, embeds, streams a generate and a chat, pulls with progress
and reads /api/ps through the gateway, checking each answer as it goes; here its summary is checked
against the Python client and against each simulated Ollama behind the gateway, asked directly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ollama
import pytest
from corral.runtime.natsserver import NatsServer

from tests.integration.corral_up import CorralUp, corral_up

pytestmark = pytest.mark.integration

JS = Path(__file__).resolve().parents[1] / "js"
MODEL, EMBED, PULL = "llama3.2", "all-minilm", "nomic-embed-text"


def _installed(root: Path) -> bool:
    """Whether node_modules holds exactly the versions package-lock.json pins."""
    lock = json.loads((root / "package-lock.json").read_text())
    for path, entry in lock["packages"].items():
        if not path:
            continue
        manifest = root / path / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != entry["version"]:
            return False
    return True


@pytest.fixture(scope="module")
def node() -> str:
    """`node`, with tests/js's pinned packages installed (`npm ci` when missing or stale)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to run the Ollama JavaScript client")
    if not _installed(JS):
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(JS)],
            capture_output=True,
            text=True,
            timeout=100,  # inside the test timeout
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
        assert _installed(JS)
    return node


async def run_script(node: str, url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS / "ollama_client.mjs"),
        url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def up(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CorralUp]:
    log = tmp_path_factory.mktemp("js") / "corral-up.log"
    async with corral_up(nats_server.url, "js", log, sims=2) as up:
        yield up


@pytest.fixture(scope="module")
async def summary(node: str, up: CorralUp) -> dict[str, Any]:
    rc, out, err = await run_script(node, up.url, MODEL, EMBED, PULL)
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def test_list_and_show(summary: dict[str, Any], up: CorralUp) -> None:
    names = summary["list"]["models"]
    assert {"llama3.2:latest", "qwen3:8b", "all-minilm:latest"} <= set(names)
    async with ollama.AsyncClient(host=next(iter(up.backends.values()))) as direct:
        shown = await direct.show(MODEL)
    assert shown.modelinfo is not None
    assert summary["show"]["context_length"] == shown.modelinfo["llama.context_length"] == 131072
    assert summary["show"]["family"] == "llama" and "completion" in summary["show"]["capabilities"]


async def test_streams_match_the_python_client(summary: dict[str, Any], up: CorralUp) -> None:
    async with ollama.AsyncClient(host=up.url) as client:
        gen = await client.generate(model=MODEL, prompt="why is the sky blue?", options={"seed": 7})
        chat = await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], options={"seed": 3}
        )
    assert summary["generate"]["text"] == gen.response and len(gen.response) > 20
    assert summary["generate"]["done_reason"] == gen.done_reason == "stop"
    assert summary["generate"]["eval_count"] == gen.eval_count
    assert summary["chat"]["text"] == chat.message.content and summary["chat"]["chunks"] > 2


async def test_pull_progress_adds_up_to_the_copy_on_one_agent(summary: dict[str, Any], up: CorralUp) -> None:
    pull = summary["pull"]
    assert (pull["first"], pull["last"]) == ("pulling manifest", "success") and pull["layers"] == 4
    sizes = {}
    for agent, url in up.backends.items():
        async with ollama.AsyncClient(host=url) as direct:
            sizes[agent] = [
                m.size for m in (await direct.list()).models if m.model == "nomic-embed-text:latest"
            ]
    holders = {agent: s for agent, s in sizes.items() if s}
    assert len(holders) == 1, sizes  # one copy by default, summed progress totals are that copy's
    assert next(iter(holders.values())) == [pull["total"]]


async def test_embed_gives_the_models_vectors_and_ps_names_the_agents(
    summary: dict[str, Any], up: CorralUp
) -> None:
    rows = {row["model"]: row for row in summary["ps"]["rows"]}
    assert {row["agent"] for row in rows.values()} <= set(up.backends)
    assert {"llama3.2:latest", "all-minilm:latest"} <= set(rows)
    # a model's vectors are the same on every server, as real Ollamas' are: the gateway's are those
    for url in up.backends.values():
        async with ollama.AsyncClient(host=url) as direct:
            assert (
                list((await direct.embed(model=EMBED, input="a")).embeddings[0]) == summary["embed"]["first"]
            )
    assert summary["embed"]["dim"] == 384


async def test_a_failed_check_exits_non_zero(node: str, up: CorralUp) -> None:
    rc, out, err = await run_script(node, up.url, "no-such-model")
    assert rc == 1 and out == "" and "check failed: no-such-model:latest listed" in err
