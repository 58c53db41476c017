"""``corral status|ps|models|pull|drain|cordon|uncordon``: the fleet from a terminal.

They talk to NATS directly (``--nats``, ``--root``), read the same KV state the gateway routes from,
and print tables for people or JSON (``--json``) for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import nats.errors
from corral import views
from corral.gateway.batch.store import BatchStore
from corral.gateway.keys import open_key_buckets
from corral.protocol import headers as H
from corral.protocol.errors import CorralError
from corral.protocol.names import VENDORS
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets, ensure_buckets_at_start, require_fleet
from corral.runtime.fleet import FleetView, received_at
from corral.runtime.kvwatch import snapshot
from corral.runtime.nats import COMMAND_ERRORS, NatsAuth, command_error, connect_command, error_text
from corral.runtime.policy import POLICY_KEY, policy_decoder
from corral.runtime.process import parse_settings
from corral.runtime.settings import SERVICES_ONLY, CommonSettings, add_arguments
from corral.runtime.workqueue import MAX_AGE_S, depths, keep_long_enough
from corral.transport import Transport, WorkRequest, send_resending
from corral.views.status import Pin
from nats.js.errors import KeyNotFoundError

_enc = msgspec.json.Encoder()

log = logging.getLogger(__name__)


def _gb(n: int) -> str:
    """Bytes in GiB, as `corral top` and the console show them; the unit is said beside it."""
    return f"{n / 2**30:.1f}"


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Aligned columns; cells other processes wrote (an agent's host, its GPUs) go to the
    terminal with their control characters escaped (`corral.views.terminal`)."""
    cells = [list(map(str, header)), *[[views.printable(str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


class _Session:
    """A NATS connection, the agents' KV watch cache and the views bucket, for one command."""

    def __init__(self, settings: CommonSettings, *, setup: bool = False) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.root)
        self.setup = setup

    async def __aenter__(self) -> _Session:
        self.nc = await connect_command(
            self.settings.nats_url, name="corral-cli", auth=NatsAuth.of(self.settings)
        )
        try:
            await self._open()
        except BaseException:  # the command ends here: what it opened goes with it
            await self.nc.close()
            raise
        return self

    async def _open(self) -> None:
        js, replicas = self.nc.jetstream(), self.settings.js_replicas
        if self.setup:
            # `corral status` is the deploy files' setup step, run as the operator beside a cluster
            # that may still be forming: as patient as a service, and it makes the API keys' buckets
            # too (with NATS identities no gateway may make them)
            self.buckets = await ensure_buckets_at_start(js, self.subjects, replicas=replicas, setup=True)
            try:
                if await keep_long_enough(js, self.subjects):
                    log.info("the queue stream now keeps requests for up to %.0f s", MAX_AGE_S)
            except COMMAND_ERRORS as e:
                log.warning(
                    "cannot give the queue stream its age limit (%s): it keeps its own", error_text(e)
                )
            try:
                await open_key_buckets(js, self.subjects, replicas=replicas)
                if self.settings.nats_creds:  # with NATS identities no gateway may make them either
                    await BatchStore.open(
                        js, self.subjects, max_payload=self.nc.max_payload, replicas=replicas
                    )
            except COMMAND_ERRORS as e:  # an identity that may not make them: its create goes unanswered
                log.warning("the API keys' or the Batch API's stores are not there and cannot be made "
                            "(%s); with NATS identities only the operator's may make them", error_text(e))  # fmt: skip
        else:
            await require_fleet(js, self.subjects)
            self.buckets = await ensure_buckets(js, self.subjects, replicas=replicas)
        self.fleet = FleetView(self.buckets.agents)
        await self.fleet.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.fleet.stop()
        await self.nc.drain()

    async def pins(self) -> dict[str, Pin]:
        """The models kept warm, as the policy record names them (`corral pin`)."""
        try:
            entry = await self.buckets.policy.get(POLICY_KEY)
        except KeyNotFoundError:  # no rules written yet
            return {}
        return policy_decoder.decode(entry.value).pins if entry.value else {}

    async def rates(self) -> views.Rates | None:
        """The aggregator's figures; None when none has written them, or its last are stale."""
        # a snapshot, not a get: its entry carries when the server stored it
        entries = await snapshot(self.buckets.views, views.RATES_KEY, timeout=5.0)
        entry = entries[-1] if entries else None
        if entry is None or not entry.value:  # no aggregator has written yet
            return None
        age = time.monotonic() - received_at(entry, snapshot=True)  # by the server's timestamp
        return views.current(views.rates_decoder.decode(entry.value), age)


async def status(s: _Session, as_json: bool) -> int:
    st = views.status_view(
        s.fleet.agents(),
        await s.rates(),
        queue=views.queue_by_model(await depths(s.nc, s.subjects)),
        pins=await s.pins(),
    )
    if as_json:
        print(_enc.encode(st).decode())
        return 0
    t = st.totals
    print(
        f"{t.agents} agents ({t.active} active), {t.gpus} GPUs, VRAM {_gb(t.vram_total - t.vram_free)} GiB used "
        f"of {_gb(t.vram_total)} GiB, {t.models} models, {t.loaded} loaded, {t.in_flight} running, {t.queued} queued"
    )
    if st.queue:
        print("waiting in the fleet queue: " + ", ".join(f"{m} {n}" for m, n in st.queue.items()))
    for p in st.pins:
        vendor = f" {p.vendor}" if p.vendor else ""
        print(
            f"pinned: {p.model} on {p.loaded}/{p.replicas}{vendor} agents ({', '.join(p.agents) or 'none yet'})"
        )
    if st.rates is not None:
        r = st.rates
        ttft = f"{r.ttft_ms_p50:.0f} ms" if r.ttft_ms_p50 is not None else "-"
        print(
            f"last {r.window_s:.0f}s: {r.requests_per_s:.2f} req/s, {r.tokens_per_s:.1f} tokens/s, "
            f"TTFT p50 {ttft}, {r.errors} errors"
        )
    else:
        print("rates: none (no aggregator has written them lately; they come from `corral aggregator`)")
    rows = [
        (
            a.id,
            a.vendor,
            a.host,
            a.status + (" (ollama down)" if a.ollama_down else ""),
            ", ".join(g.name for g in a.gpus) or "-",
            f"{_gb(a.vram_total - a.vram_free)}/{_gb(a.vram_total)}",
            ", ".join(m.model for m in a.loaded) or "-",
            f"{a.in_flight}/{a.slots}",
            a.queued,
        )
        for a in st.agents
    ]
    print()
    print(
        table(rows, ("AGENT", "VENDOR", "HOST", "STATUS", "GPUS", "VRAM GiB", "LOADED", "RUNNING", "QUEUED"))
    )
    return 0


FOREVER_S = 20 * 365 * 86400  # `ollama ps` says Forever past twenty years (Ollama's format.HumanTime)


def _until(expires_at: str) -> str:
    """A runner's expiry as `ollama ps` words one kept to stay (``keep_alive: -1``); else as is."""
    return "Forever" if views.parse_time(expires_at) - time.time() > FOREVER_S else expires_at


async def ps(s: _Session, as_json: bool) -> int:
    rows = views.merged_ps(s.fleet.agents())
    if as_json:
        print(_enc.encode({"models": rows}).decode())
        return 0
    print(
        table(
            [
                (
                    r.name,
                    r.corral.agent,
                    r.corral.vendor,
                    _gb(r.size),
                    _gb(r.size_vram),
                    r.context_length,
                    _until(r.expires_at),
                )
                for r in rows
            ],
            ("NAME", "AGENT", "VENDOR", "SIZE GiB", "IN VRAM GiB", "CONTEXT", "UNTIL"),
        )
    )
    return 0


async def models(s: _Session, as_json: bool) -> int:
    agents = s.fleet.agents()
    merged = views.merged_tags(agents)
    where: dict[str, list[str]] = {}
    for a in agents:
        for m in a.models:
            where.setdefault(m.name, []).append(a.id)
    if as_json:
        print(_enc.encode([{"model": m, "agents": sorted(where.get(m.name, []))} for m in merged]).decode())
        return 0
    print(
        table(
            [
                (
                    m.name,
                    _gb(m.size),
                    m.details.parameter_size,
                    m.details.quantization_level,
                    ", ".join(sorted(where.get(m.name, []))),
                )
                for m in merged
            ],
            ("NAME", "SIZE GiB", "PARAMS", "QUANT", "ON AGENTS"),
        )
    )
    return 0


async def pull(s: _Session, as_json: bool, model: str, replicas: str, vendor: str | None) -> int:
    order: dict[str, Any] = {"model": model, "stream": True, "vendor": vendor}
    order |= {"all": True} if replicas == "all" else {"replicas": int(replicas)}
    transport = Transport(s.nc, s.subjects)
    await transport.start()
    try:
        reply = await send_resending(
            transport, s.subjects.registry("pull"), WorkRequest("/api/pull", _enc.encode(order)), timeout=5
        )
        if reply is None:
            print(
                "corral pull: no registry is running (start `corral registry` or `corral up`)",
                file=sys.stderr,
            )
            return 1
        async with reply:
            return await _progress(reply.lines(), as_json) or (1 if reply.status != 200 else 0)
    except CorralError as e:
        print(f"corral pull: {e.message}", file=sys.stderr)
        return 1
    finally:
        await transport.stop()


async def _progress(lines: AsyncIterator[bytes], as_json: bool) -> int:
    """Print a pull's progress lines as they come; 1 when one was an error."""
    failed, last_draw = False, 0.0
    open_line = False  # a line printed without its newline yet (the next starts with one)
    async for raw in lines:
        obj = msgspec.json.decode(raw)
        if as_json:
            print(raw.decode(), flush=True)
            continue
        if "error" in obj:
            failed = True
            print(f"\nerror: {obj['error']}" if open_line else f"error: {obj['error']}", file=sys.stderr)
        elif obj.get("total"):
            now = time.monotonic()
            done = obj.get("completed", 0) / obj["total"]
            if now - last_draw > 0.1 or done >= 1:
                last_draw = now
                bar = "#" * int(done * 30)
                print(
                    f"\r{obj['status']:<24} [{bar:<30}] {done:4.0%} of {_gb(obj['total'])} GiB",
                    end="",
                    flush=True,
                )
                open_line = True
        else:
            print(f"\n{obj['status']}" if open_line else obj["status"], end="", flush=True)
            open_line = True
    if open_line:
        print()
    return 1 if failed else 0


async def control(s: _Session, kind: str, agent: str) -> int:
    if s.fleet.get(agent) is None:
        print(f"corral {kind}: no agent {agent!r} (see `corral status`)", file=sys.stderr)
        return 1
    try:
        await s.nc.request(s.subjects.agent_admin(agent), b"", headers={H.CTL: kind}, timeout=5)
    except nats.errors.Error as e:  # a timeout, or no responders
        print(f"corral {kind}: agent {agent} did not answer: {e}", file=sys.stderr)
        return 1
    done = {
        "drain": "draining: takes no new work, running requests finish",
        "cordon": "cordoned: takes no new work",
        "uncordon": "active again",
    }[kind]
    print(f"{agent}: {done}")
    return 0


def parser(command: str) -> argparse.ArgumentParser:
    texts = {
        "status": "The fleet at a glance: agents, GPUs, VRAM, loaded models, running and queued requests, rates.",
        "ps": "Loaded models across the fleet, one row per agent and model.",
        "models": "Models on disk across the fleet, and which agents have each.",
        "pull": "Pull a model onto one or more agents (through the registry), with progress.",
        "drain": "Stop sending new work to an agent; its running requests finish.",
        "cordon": "Stop sending new work to an agent (same as drain, for maintenance).",
        "uncordon": "Let a drained or cordoned agent take work again.",
    }
    p = argparse.ArgumentParser(allow_abbrev=False, prog=f"corral {command}", description=texts[command])
    if command in ("drain", "cordon", "uncordon"):
        p.add_argument("agent", help="agent id (see `corral status`)")
    if command == "pull":
        p.add_argument("model", help="model name, e.g. llama3.2 or hf.co/user/repo:Q4_K_M")
        p.add_argument("--replicas", default="1", help="on how many agents (a number, or 'all'); default 1")
        p.add_argument("--vendor", choices=VENDORS, help="only agents of this vendor")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_arguments(p, CommonSettings, leave=SERVICES_ONLY)
    return p


def main(command: str, argv: list[str] | None = None) -> int:
    parsed = parse_settings(parser(command), CommonSettings, argv)
    if parsed is None:
        return 2
    args, settings = parsed
    if (
        command == "pull"
        and args.replicas != "all"
        and not (args.replicas.isdigit() and int(args.replicas) > 0)
    ):
        print("corral pull: --replicas must be a positive number or 'all'", file=sys.stderr)
        return 2

    async def go() -> int:
        async with _Session(settings, setup=command == "status") as s:
            if command == "status":
                return await status(s, args.json)
            if command == "ps":
                return await ps(s, args.json)
            if command == "models":
                return await models(s, args.json)
            if command == "pull":
                return await pull(s, args.json, args.model, args.replicas, args.vendor)
            return await control(s, command, args.agent)

    try:
        return asyncio.run(go())
    except COMMAND_ERRORS as e:
        print(f"corral {command}: {command_error(settings.nats_url, e)}", file=sys.stderr)
        return 1
