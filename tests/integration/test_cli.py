"""The CLI as a real process: the fleet commands against a live fleet, and bad settings refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import openai
import pytest
from corral import up
from corral.protocol.names import parse_name
from corral.runtime.natsserver import NatsServer, free_port
from corral.up import FleetOptions, LocalFleet, default_sims

from tests.integration import cli_helpers as cli
from tests.integration import waits
from tests.integration.corral_up import corral_up
from tests.integration.fleet_helpers import preload, until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def fleet(nats_server: NatsServer) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0, nats_url=nats_server.url, root="cli", sims=default_sims(2, time_scale=0.001)
    )
    async with LocalFleet(options) as f:
        await preload(f, "llama3.2")
        yield f


async def corral(fleet: LocalFleet, *args: str) -> tuple[int, str, str]:
    return await cli.corral(*args, "--nats", fleet.nats_url, "--root", "cli")


async def test_status_ps_models(fleet: LocalFleet) -> None:
    rc, out, _ = await corral(fleet, "status", "--json")
    status = json.loads(out)
    assert rc == 0 and status["totals"]["agents"] == 2 and status["totals"]["loaded"] == 2
    assert {a["vendor"] for a in status["agents"]} == {"nvidia", "amd"}
    rc, out, _ = await corral(fleet, "ps", "--json")
    rows = json.loads(out)["models"]
    assert sorted(r["corral"]["agent"] for r in rows) == sorted(a.id for a in fleet.agents)
    rc, out, _ = await corral(fleet, "models", "--json")
    by_name = {m["model"]["name"]: m["agents"] for m in json.loads(out)}
    assert sorted(by_name["llama3.2:latest"]) == sorted(a.id for a in fleet.agents)
    rc, out, _ = await corral(fleet, "status")
    assert rc == 0 and "2 agents (2 active)" in out and "nvidia-0" in out
    # sizes in GiB, said as `corral top` and the console say them
    total = status["totals"]["vram_total"] / 2**30
    assert f"of {total:.1f} GiB" in out and "VRAM GiB" in out, out
    rc, out, _ = await corral(fleet, "ps")
    assert rc == 0 and out.split("\n")[0].split()[3:7] == ["SIZE", "GiB", "IN", "VRAM"], out
    # loaded to stay (keep_alive -1): said as `ollama ps` says it, not as a date three centuries on
    assert [line.split()[-1] for line in out.strip().split("\n")[1:]] == ["Forever", "Forever"], out


async def _piped(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """``corral ARGS`` writing into a pipe: the process, and the pipe's read end (the caller's)."""
    read, write = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "corral.cli", *args,
            stdout=write, stderr=asyncio.subprocess.PIPE, env=cli.without_corral_settings(),
        )  # fmt: skip
    finally:
        os.close(write)
    return proc, read


async def test_output_into_a_reader_that_stopped_ends_quietly(fleet: LocalFleet) -> None:
    """``corral status | head -1``: the reader is gone before the output is written (here, at
    once), and the command ends as other tools do, with no traceback."""
    proc, read = await _piped("status", "--nats", fleet.nats_url, "--root", "cli")
    os.close(read)  # a reader that took what it wanted and left
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


async def test_top_into_a_pipe_writes_plain_frames_and_stops_when_the_reader_goes(fleet: LocalFleet) -> None:
    """``corral top | tee log``: no cursor escapes, whole frames one after another; ``| head`` ends it."""
    proc, read = await _piped("top", "--url", fleet.url, "--interval", "0.01")
    frames: list[list[str]] = [[]]
    with open(read, encoding="utf-8") as reader:  # closed after two frames: the reader leaves
        async with asyncio.timeout(60):
            while len(frames) < 3:
                line = await asyncio.to_thread(reader.readline)
                assert line, "top ended early"
                if line == "\n":
                    frames.append([])
                else:
                    frames[-1].append(line)
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    text = "".join(frames[0] + frames[1])
    assert "\x1b" not in text, text
    assert frames[0][0].startswith("corral top  " + fleet.url), frames[0]
    assert all(a.id in "".join(frames[1]) for a in fleet.agents), frames[1]
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()


async def test_pull_with_replicas(fleet: LocalFleet) -> None:
    rc, out, err = await corral(fleet, "pull", "gemma3:4b", "--replicas", "2", "--json")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert lines[-1] == {"status": "success"}
    assert fleet.gateway is not None
    key = parse_name("gemma3:4b").key
    await until(fleet, lambda: len(fleet.gateway.fleet.with_model(key)) == 2)  # type: ignore[union-attr]
    rc, _, err = await corral(fleet, "pull", "no-such-model")
    assert rc == 1 and "file does not exist" in err
    # more replicas than agents of that vendor: done where it can be, and said so first
    rc, out, err = await corral(fleet, "pull", "gemma3:4b", "--vendor", "amd", "--replicas", "2")
    assert rc == 0, err
    assert out.splitlines()[0] == "only 1 agent of vendor amd can take this pull (2 asked for)"
    assert out.rstrip().endswith("success")


async def test_drain_and_uncordon(fleet: LocalFleet) -> None:
    assert fleet.gateway is not None
    agent = fleet.agents[0].id
    rc, out, _ = await corral(fleet, "drain", agent)
    assert rc == 0 and "draining" in out
    await until(fleet, lambda: fleet.gateway.fleet.get(agent).status == "draining")  # type: ignore[union-attr]
    rc, _, _ = await corral(fleet, "uncordon", agent)
    await until(fleet, lambda: fleet.gateway.fleet.get(agent).status == "active")  # type: ignore[union-attr]
    rc, _, err = await corral(fleet, "drain", "nobody")
    assert rc == 1 and "no agent 'nobody'" in err


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``corral ARGS`` as a real process, with only the ``CORRAL_*`` variables given here."""
    return await cli.corral(*args, env=cli.without_corral_settings(env))


async def test_a_bad_flag_value_exits_2_with_a_clear_message() -> None:
    rc, out, err = await run_cli("gateway", "--strategy", "bogus")
    assert rc == 2 and out == ""
    assert "corral gateway: error: argument --strategy: invalid choice: 'bogus'" in err
    assert "round_robin" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "env", "named"),
    [
        ("gateway", {"CORRAL_STRATEGY": "bogus"}, "CORRAL_STRATEGY / --strategy: expected one of 'auto'"),
        ("agent", {"CORRAL_PARALLEL": "0"}, "CORRAL_PARALLEL / --parallel: Expected `int` >= 1 (got '0')"),
    ],
)
async def test_a_bad_environment_value_exits_2_naming_variable_and_flag(
    command: str, env: dict[str, str], named: str
) -> None:
    rc, out, err = await run_cli(command, env=env)
    assert rc == 2 and out == ""
    assert err.startswith(f"corral {command}: invalid setting ") and named in err, err
    assert "Traceback" not in err


async def test_help_lists_every_setting_with_its_default() -> None:
    rc, out, _ = await run_cli("registry", "--help")
    assert rc == 0
    for flag in ("--dead-after-s", "--dead-after", "--replica-check-s", "--nats-url", "--nats"):
        assert flag in out
    assert "CORRAL_PULL_TIMEOUT_S" in out and "3600.0" in out


async def test_up_whose_nats_port_is_taken_exits_1_with_a_clear_message() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, out, err = await run_cli("up", "--nats-port", str(port), "--port", "0", "--sim", "1")
    assert rc == 1 and "Traceback" not in err and "Corral is up" not in out, err
    assert f"corral up: the embedded NATS cannot listen: 127.0.0.1:{port} is taken" in err, err
    assert "give another --nats-port" in err


def test_up_takes_a_free_nats_port_while_natss_own_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --nats-port, another NATS on 4222 (another fleet's, a system one) does not stop
    `corral up`: its embedded one takes a free port, which its banner prints."""
    assert up.embedded_nats_port(4333) == 4333  # given: as given, taken or not
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setattr(up, "NATS_PORT", held.getsockname()[1])
        assert up.embedded_nats_port(None) == 0  # a free one
    free = free_port()
    monkeypatch.setattr(up, "NATS_PORT", free)
    assert up.embedded_nats_port(None) == free


@pytest.mark.parametrize("command", ["keys", "batch", "auth"])
async def test_a_commands_help_reads_as_plain_text(command: str) -> None:
    rc, out, _ = await run_cli(command, "--help")
    assert rc == 0 and f"corral {command}" in out and "``" not in out, out


@contextlib.asynccontextmanager
async def corral_nats(store: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``corral nats`` as a process, once it says its server is up; killed if a test leaves it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "nats", "--port", str(free_port()), "--store-dir", str(store),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert b"nats-server with JetStream on" in await asyncio.wait_for(proc.stdout.readline(), 30)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
async def test_corral_nats_stopped_by_a_signal_exits_0(tmp_path: Path, sig: str) -> None:
    """A supervisor stopping the embedded nats-server sees a clean exit, not a failure."""
    async with corral_nats(tmp_path / "js") as proc:
        proc.send_signal(getattr(signal, sig))
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_corral_nats_whose_server_is_killed_says_so_and_exits_1(tmp_path: Path) -> None:
    async with corral_nats(tmp_path / "js") as proc:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1  # its nats-server
        os.kill(int(children[0]), signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 30) == 1
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "corral nats: nats-server ended (killed by signal 9); stopping" in err, err


@pytest.mark.parametrize("command", [["status"], ["pin", "llama3.2"], ["keys", "list"]])
async def test_a_fleet_command_jetstream_cannot_answer_exits_1_with_a_clear_message(
    command: list[str],
) -> None:
    """JetStream that does not answer (here none at all; as well a cluster without a quorum): one
    line that says so, no traceback."""
    async with NatsServer(jetstream=False) as server:
        rc, _, err = await cli.corral(*command, "--nats", server.url, "--root", "cli")
    assert rc == 1 and "did not answer" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["status"], ["ps"], ["pin", "llama3.2"], ["keys", "list"]])
async def test_a_command_with_no_nats_to_reach_exits_1_with_a_clear_message(command: list[str]) -> None:
    """Nothing listens at the URL: after a few tries the command says so and exits 1, where a
    service would wait for NATS for ever (a script or a health check calling it must not hang)."""
    url = f"nats://127.0.0.1:{free_port()}"
    rc, _, err = await cli.corral(*command, "--nats", url, "--root", "cli", timeout=30)
    assert rc == 1 and f"cannot reach NATS at {url}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err  # its own line, not nats-py's error before it too


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["keys", "list"],
        ["gateway", "--port", "0"],
        ["agent", "--ollama-url", "http://127.0.0.1:9"],
    ],
)
@pytest.mark.parametrize(
    "files",
    [["--nats-creds", "/nonexistent/x.creds"], ["--nats-tls-key", "/nonexistent/k.pem"]],
    ids=["creds", "tls-key-alone"],
)
async def test_an_identity_file_that_cannot_be_used_is_one_line_and_exit_1(
    command: list[str], files: list[str]
) -> None:
    """A credentials or TLS file missing, unreadable or incomplete: the command or service says
    which in one line and exits 1, before it tries NATS."""
    rc, _, err = await cli.corral(*command, *files, "--nats", f"nats://127.0.0.1:{free_port()}", timeout=30)
    assert rc == 1 and "Traceback" not in err, err
    assert "cannot read NATS credentials" in err or "--nats-tls-key needs --nats-tls-cert" in err, err


async def test_a_key_made_under_a_root_no_fleet_uses_comes_with_a_note(nats_server: NatsServer) -> None:
    """Keys may be made before the fleet starts, so the key is made; but a mistyped ``--root`` would
    give a key every gateway refuses, so the command says no fleet runs there."""
    root = "typo" + secrets.token_hex(4)
    rc, out, err = await cli.corral("keys", "create", "early", "--nats", nats_server.url, "--root", root)
    assert rc == 0 and out.strip(), err
    assert f"note: no fleet under root {root!r}" in err, err
    rc, _, err = await cli.corral("status", "--nats", nats_server.url, "--root", root)  # the fleet's stores
    assert rc == 0, err
    rc, out, err = await cli.corral("keys", "list", "--nats", nats_server.url, "--root", root)
    assert rc == 0 and "early" in out and "note:" not in err, err


@pytest.mark.parametrize("command", [["ps"], ["models"], ["drain", "nvidia-0"], ["pin"], ["alias", "a", "b"]])
async def test_a_command_under_a_root_no_fleet_uses_makes_nothing(
    nats_server: NatsServer, command: list[str]
) -> None:
    """A mistyped ``--root``: the command says no fleet lives there, exits 1, and makes no bucket
    or stream of that root (`corral status`, the setup step, does)."""
    root = "typo" + secrets.token_hex(4)
    rc, _, err = await cli.corral(*command, "--nats", nats_server.url, "--root", root)
    assert rc == 1 and f"no fleet under root {root!r}" in err and "Traceback" not in err, err
    nc = await nats.connect(nats_server.url)
    try:
        names = [info.config.name for info in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert not [n for n in names if root in (n or "")], names
    rc, _, err = await cli.corral("status", "--nats", nats_server.url, "--root", root)
    assert rc == 0, err
    rc, _, err = await cli.corral(*command, "--nats", nats_server.url, "--root", root)
    assert "no fleet" not in err, err  # the setup step made it


@pytest.mark.parametrize(
    ("service", "sig"),
    [
        ("agent", "SIGINT"),
        ("agent", "SIGTERM"),
        ("gateway", "SIGINT"),
        ("registry", "SIGINT"),
        ("registry", "SIGTERM"),
        ("aggregator", "SIGTERM"),
    ],
)
async def test_a_service_still_waiting_for_nats_stops_at_a_signal(service: str, sig: str) -> None:
    """Ctrl-C or a supervisor's SIGTERM while a service waits for its first NATS connection: it
    stops at once and exits 0, as it would once up. The agent ignored both and waited on; the
    others printed a KeyboardInterrupt traceback or died without closing what they had opened."""
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: the service keeps trying
    extra = ["--ollama-url", f"http://127.0.0.1:{free_port()}"] if service == "agent" else []
    extra += ["--port", "0"] if service == "gateway" else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", service, "--nats", url, *extra,
        env=cli.without_corral_settings(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    err = b""
    try:
        assert proc.stderr is not None
        while b"NATS error" not in err:  # it is trying to connect now
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, err.decode()
            err += line
        proc.send_signal(getattr(signal, sig))
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, (err + rest).decode()
        assert b"Traceback" not in rest, rest.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_fleet_command_given_ctrl_c_ends_as_a_shell_expects() -> None:
    """Ctrl-C on a command (here one still trying to reach NATS): exit status 130, no traceback.
    What it reaches is a socket that never speaks NATS, so the command is known to be connecting."""
    reached = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # open, and never a word of NATS's INFO
        reached.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "ps", "--nats", f"nats://127.0.0.1:{port}",
        env=cli.without_corral_settings(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        await asyncio.wait_for(reached.wait(), 30)  # it is trying to connect now
        proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 130 and b"Traceback" not in rest, rest.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_corral_up_given_ctrl_c_again_while_it_drains_still_stops_cleanly(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """An impatient second Ctrl-C during the drain is said and ignored: exit status 0, no
    KeyboardInterrupt cutting the drain short with a traceback."""
    log = tmp_path / "up.log"
    async with corral_up(nats_server.url, "upctrlc", log, sims=1, ctrl_c=2):
        pass
    text = log.read_text()
    assert "SIGINT: already stopping" in text and "Traceback" not in text, text[-3000:]


async def test_corral_up_takes_the_services_settings_from_the_environment(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """``CORRAL_*`` variables reach the gateway (and the registry and aggregator) `corral up` runs,
    as they reach each service run alone: here a body bound. They used to be ignored but for a few."""
    env = {"CORRAL_MAX_BODY_BYTES": "100000"}
    async with corral_up(nats_server.url, "upenv", tmp_path / "up.log", sims=1, env=env) as up:
        body = json.dumps({"model": "llama3.2", "prompt": "x" * 200_000}).encode()
        async with aiohttp.ClientSession() as s, s.post(f"{up.url}/api/generate", data=body) as r:
            assert r.status == 413, await r.text()


async def test_corral_ups_banner_says_which_ollama_is_not_answering(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A backend given with ``--ollama`` that does not answer is said so in the banner, beside the
    simulated one that does, not only in warnings every few seconds after it."""
    dead = f"http://127.0.0.1:{free_port()}"
    extra = ["--ollama", f"nvidia={dead}"]
    async with corral_up(nats_server.url, "updown", tmp_path / "up.log", sims=1, extra=extra) as up:
        down = [a for a, url in up.backends.items() if url == dead]
        assert len(up.backends) == 2 and len(down) == 1, up.printed
        assert up.remarks == {down[0]: "(not answering: its agent offers nothing until it does)"}, up.printed


async def test_corral_up_keeps_its_state_in_a_store_dir_across_a_restart(tmp_path: Path) -> None:
    """With ``--store-dir`` the embedded NATS keeps JetStream there: a file uploaded before a
    restart is there after it (by default the store is a temporary one, gone at stop)."""
    extra = ["--store-dir", str(tmp_path / "js"), "--nats-port", str(free_port())]
    async with corral_up("", "upstore", tmp_path / "up1.log", sims=1, extra=extra) as up:
        async with openai.AsyncOpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0) as c:
            made = await c.files.create(file=("kept.txt", b"kept"), purpose="user_data")
    async with corral_up("", "upstore", tmp_path / "up2.log", sims=1, extra=extra) as up:
        async with openai.AsyncOpenAI(base_url=up.url + "/v1", api_key="x", max_retries=0) as c:
            assert [f.id async for f in c.files.list()] == [made.id]
            assert (await c.files.content(made.id)).content == b"kept"


async def test_corral_status_says_when_an_agents_ollama_is_down(nats_server: NatsServer) -> None:
    """An agent that cannot read its Ollama offers nothing; `corral status` (and ``/api/status``)
    says why, where it used to show a plain "active" agent with nothing on it."""
    options = FleetOptions(
        port=0, nats_url=nats_server.url, root="clidown", sims=default_sims(1, time_scale=0.001),
        agent={"refresh_s": 0.2},
    )  # fmt: skip
    async with LocalFleet(options) as f:
        assert f.gateway is not None
        view = f.gateway.fleet
        await f.sims[0].stop()
        await waits.until(lambda: any(a.ollama_down for a in view.agents()), view.wait_changed, timeout=20)
        rc, out, _ = await cli.corral("status", "--nats", f.nats_url, "--root", "clidown")
        assert rc == 0 and "active (ollama down)" in out, out
        rc, out, _ = await cli.corral("status", "--json", "--nats", f.nats_url, "--root", "clidown")
        assert [a["ollama_down"] for a in json.loads(out)["agents"]] == [True]
        # and its models are not "not found" (a 404 has the ollama CLI pull them): its Ollama is down
        async with aiohttp.ClientSession() as s:
            body = {"model": "llama3.2", "prompt": "x", "stream": False}
            async with s.post(f"{f.url}/api/generate", json=body) as r:
                assert r.status == 502 and "cannot be read now (nvidia-0)" in (await r.json())["error"]


async def test_a_metrics_port_in_use_is_said_in_one_line(nats_server: NatsServer) -> None:
    """A service whose --metrics-port is taken exits 1 saying so, not with a traceback."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err = await cli.corral(
            "aggregator", "--nats", nats_server.url, "--root", "metricsport", "--metrics-port", str(port)
        )
    assert rc == 1 and f"cannot serve metrics on port {port}" in err and "Traceback" not in err, err
