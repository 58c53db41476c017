"""Does NATS hand out work more slowly when 1,000 agents claim it? Request latency on one queue
group of 10 versus N (default 1,000) subscribers, each on its own connection, in one run.

    .venv/bin/python -m bench.claims [--subscribers 1000] [--requests 2000]

Each subscriber answers at once. Two ways of subscribing are measured: a plain queue subscription,
and the way Corral's agents hold a claim (`corral.agent.claims`): a single-shot subscription
(``UNSUB <sid> 1``) armed again after each delivery, so the server's subscription list changes with
every request. One requester sends requests one at a time (concurrency 1); latency is from publish
to reply. Everything runs against an embedded nats-server on 127.0.0.1; the subscribers share this
process, as `bench.scale`'s agents share its fleet process.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.common import free_port, loop_name, machine, percentile, run, table

SUBJECT, GROUP = "work", "claimers"


async def measure(url: str, n: int, rearm: bool, requests: int) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``requests`` requests to ``n`` subscribers."""
    conns: list[NATS] = []

    async def subscriber() -> None:
        nc = await nats.connect(url)
        conns.append(nc)

        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, b"ok")
            if rearm:
                await arm()

        async def arm() -> None:
            sub = await nc.subscribe(SUBJECT, queue=GROUP, cb=answer)
            if rearm:
                await sub.unsubscribe(1)

        await arm()

    requester: NATS | None = None
    try:
        for i in range(0, n, 50):
            await asyncio.gather(*(subscriber() for _ in range(min(50, n - i))))
        requester = await nats.connect(url)
        for _ in range(min(200, requests)):  # warm-up
            await requester.request(SUBJECT, b"x", timeout=5)
        took = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await requester.request(SUBJECT, b"x", timeout=5)
            took.append((time.perf_counter() - t0) * 1000)
        return percentile(took, 50), percentile(took, 99)
    finally:
        for nc in [*conns, *([requester] if requester else [])]:
            await nc.close()


async def amain(args: argparse.Namespace) -> int:
    from corral.runtime.natsserver import NatsServer

    print(f"machine: {machine()}; {loop_name()}", flush=True)
    rows = []
    for rearm in (False, True):
        figures = []
        for n in (args.small, args.subscribers):
            server = NatsServer(port=free_port())
            await server.start()
            try:
                figures.append(await measure(server.url, n, rearm, args.requests))
            finally:
                await server.stop()
        (a50, a99), (b50, b99) = figures
        kind = "single-shot, armed again" if rearm else "plain queue subscription"
        rows.append([kind, f"{a50:.3f}", f"{b50:.3f}", f"{a99:.3f}", f"{b99:.3f}", f"{b50 / a50:.2f}x"])
    n, m = args.small, args.subscribers
    print(
        table(
            ["subscribers", f"p50 ms, {n}", f"p50 ms, {m}", f"p99 ms, {n}", f"p99 ms, {m}", "p50 ratio"], rows
        )
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000, help="the large queue group (default 1000)")
    p.add_argument("--small", type=int, default=10, help="the small one compared with (default 10)")
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    return run(amain(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
