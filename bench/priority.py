"""Interactive latency beside a batch job: what request priorities buy.

Three runs, each on a fresh fleet of the routing benchmark's simulated machines (`bench.routing.fleet`)
with one model loaded everywhere:

- ``idle``: interactive chat clients alone (streamed ``/api/chat``, think time between turns);
- ``batch``: the same clients while a batch of ``--lines`` requests runs on the same model at
  ``X-Corral-Priority: batch`` (``--via requests``: ``--concurrency`` senders, as a batch runner
  would; ``--via api``: the lines submitted through the OpenAI Batch API, ``/v1/files`` +
  ``/v1/batches``);
- ``flat``: the same batch sent without a priority (interactive, as every request was before
  priorities): the control.

It prints the interactive TTFT p50/p95 of each run (simulated seconds), the ratio of each to the
idle figure (goal: batch within 1.2×), and the batch lines finished while the clients ran (the
batch must still make progress). ``python -m bench.priority --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from corral.up import LocalFleet

from bench.common import fmt, loop_name, machine, percentile, run, table, write_json
from bench.routing.fleet import MACHINES, fleet_options, prewarm, wait_ready

MODEL = "llama3.2:3b"
RUNS = ("idle", "batch", "flat")


@dataclass
class Figures:
    run: str
    ttft: list[float] = field(default_factory=list)  # interactive, simulated seconds
    errors: int = 0
    batch_done: int = 0  # batch lines finished while the clients ran
    batch_failed: int = 0
    wall_s: float = 0.0


async def chat_client(
    s: aiohttp.ClientSession, url: str, rng: random.Random, scale: float, stop: asyncio.Event, out: Figures
) -> None:
    """Streamed chats with a think time between turns; TTFT to the first content chunk."""
    while not stop.is_set():
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"question {rng.random()}"}],
            "stream": True,
            "options": {"num_predict": 48},
        }
        t0 = time.monotonic()
        first = None
        try:
            async with s.post(url + "/api/chat", json=body) as r:
                async for line in r.content:
                    if first is None and b'"content":"' in line and b'"content":""' not in line:
                        first = time.monotonic()
                ok = r.status == 200
        except aiohttp.ClientError:
            ok = False
        if ok and first is not None:
            out.ttft.append((first - t0) / scale)
        else:
            out.errors += 1
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 2.0) * scale)
        except TimeoutError:
            pass


def batch_lines(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"summarise document {i}"}],
                "max_tokens": 128,
            },
        }
        for i in range(n)
    ]


async def batch_by_requests(
    s: aiohttp.ClientSession, url: str, lines: list[dict[str, Any]], concurrency: int, priority: str | None,
    out: Figures, counting: asyncio.Event,
) -> None:  # fmt: skip
    """``concurrency`` senders working through ``lines``; a 503 is retried after a short pause."""
    todo = list(reversed(lines))
    headers = {"X-Corral-Priority": priority} if priority else {}

    async def sender() -> None:
        while todo:
            line = todo.pop()
            while True:
                async with s.post(url + line["url"], json=line["body"], headers=headers) as r:
                    await r.read()
                    if r.status != 503:
                        break
                await asyncio.sleep(0.05)  # the fleet is full: the line waits its turn, as a runner's would
            if counting.is_set():
                if r.status == 200:
                    out.batch_done += 1
                else:
                    out.batch_failed += 1

    await asyncio.gather(*(sender() for _ in range(concurrency)))


async def batch_by_api(
    s: aiohttp.ClientSession, url: str, lines: list[dict[str, Any]], out: Figures, counting: asyncio.Event
) -> None:
    """Submit ``lines`` through the Batch API and follow its request counts."""
    data = aiohttp.FormData()
    data.add_field("purpose", "batch")
    jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
    data.add_field("file", io.BytesIO(jsonl), filename="bench.jsonl", content_type="application/jsonl")
    async with s.post(url + "/v1/files", data=data) as r:
        r.raise_for_status()
        file_id = (await r.json())["id"]
    spec = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    async with s.post(url + "/v1/batches", json=spec) as r:
        r.raise_for_status()
        batch_id = (await r.json())["id"]
    base = (0, 0)
    while True:
        async with s.get(f"{url}/v1/batches/{batch_id}") as r:
            batch = await r.json()
        counts = batch.get("request_counts") or {}
        done, failed = counts.get("completed", 0), counts.get("failed", 0)
        if not counting.is_set():
            base = (done, failed)
        else:
            out.batch_done, out.batch_failed = done - base[0], failed - base[1]
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return
        await asyncio.sleep(0.25)  # a progress poll, as `corral batch submit --wait` does


async def one_run(name: str, args: argparse.Namespace) -> Figures:
    out = Figures(name)
    scale = args.time_scale
    async with LocalFleet(fleet_options(args.seed, scale)) as fleet:
        await wait_ready(fleet, len(MACHINES))
        await prewarm(fleet, [MODEL])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
            stop, counting = asyncio.Event(), asyncio.Event()
            batch: asyncio.Task[None] | None = None
            if name != "idle":
                lines = batch_lines(args.lines)
                if args.via == "api" and name == "batch":
                    batch = asyncio.create_task(batch_by_api(s, fleet.url, lines, out, counting))
                else:
                    priority = "batch" if name == "batch" else None
                    batch = asyncio.create_task(
                        batch_by_requests(s, fleet.url, lines, args.concurrency, priority, out, counting)
                    )
                await asyncio.sleep(args.warmup * scale)  # the batch fills the fleet first
            counting.set()
            rng = random.Random(args.seed)
            t0 = time.monotonic()
            clients = [
                asyncio.create_task(chat_client(s, fleet.url, random.Random(rng.random()), scale, stop, out))
                for _ in range(args.chats)
            ]
            await asyncio.sleep(args.seconds * scale)
            stop.set()
            await asyncio.gather(*clients)
            counting.clear()
            out.wall_s = time.monotonic() - t0
            if batch is not None:
                batch.cancel()
                await asyncio.gather(batch, return_exceptions=True)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.priority", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--lines", type=int, default=1000, help="batch lines (default 1000)")
    p.add_argument("--via", choices=("requests", "api"), default="requests", help="how the batch is sent")
    p.add_argument("--concurrency", type=int, default=32, help="batch senders with --via requests (32)")
    p.add_argument("--chats", type=int, default=6, help="interactive chat clients (6)")
    p.add_argument("--seconds", type=float, default=150.0, help="simulated seconds the clients run (150)")
    p.add_argument("--warmup", type=float, default=20.0, help="simulated seconds the batch runs first (20)")
    p.add_argument("--time-scale", type=float, default=0.2, help="wall seconds per simulated second (0.2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--json", metavar="FILE", help="write the figures here too")
    return p


async def main_async(args: argparse.Namespace) -> int:
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if bad := [r for r in runs if r not in RUNS]:
        raise SystemExit(f"unknown runs: {', '.join(bad)}; valid: {', '.join(RUNS)}")
    print(f"# bench.priority on {machine()}, {loop_name()}; time scale {args.time_scale}", flush=True)
    results: dict[str, Figures] = {}
    for name in runs:
        results[name] = await one_run(name, args)
        f = results[name]
        print(f"  {name}: {len(f.ttft)} interactive requests, {f.batch_done} batch lines", flush=True)
    idle = results.get("idle")
    idle_p95 = percentile(idle.ttft, 95) if idle else float("nan")
    rows = []
    for name, f in results.items():
        p95 = percentile(f.ttft, 95)
        rows.append([
            name, len(f.ttft), f.errors, fmt(percentile(f.ttft, 50)), fmt(p95),
            fmt(p95 / idle_p95) if idle else "-", f.batch_done, f.batch_failed,
            fmt(f.batch_done / (f.wall_s / args.time_scale)) if f.wall_s else "-",
        ])  # fmt: skip
    print(
        table(
            ["run", "requests", "errors", "TTFT p50 s", "TTFT p95 s", "p95 ÷ idle", "batch done",
             "batch failed", "batch lines/s"],
            rows,
        )
    )  # fmt: skip
    if args.json:
        write_json(args.json, {"args": vars(args), "runs": {n: vars(f) for n, f in results.items()}})
    return 0


def main() -> int:
    return run(main_async(parser().parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
