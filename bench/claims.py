"""Does NATS hand out work more slowly when 1,000 agents claim it? Request latency on one queue
group of 10 versus N (default 1,000) subscribers, each on its own connection, in one run.

    .venv/bin/python -m bench.claims [--subscribers 1000] [--requests 2000] [--churn-minutes 5]

Each subscriber answers at once. Two ways of subscribing are measured: a plain queue subscription,
and the way Corral's agents hold a claim (`corral.agent.claims`): a single-shot subscription
(``UNSUB <sid> 1``, `corral.runtime.singleshot`) armed again after each delivery, so the server's
subscription list changes with every request. One requester sends requests one at a time (concurrency 1); latency is from publish
to reply. Everything runs against an embedded nats-server on 127.0.0.1; the subscribers share this
process, as `bench.scale`'s agents share its fleet process.

With ``--churn-minutes M`` it then sends requests at concurrency 16 to ``--churn-subscribers`` (4)
re-armed claimers for M minutes and prints nats-server's RSS every 30 s: whether the claim churn of
a busy fleet, with nothing else on the server, grows nats-server's memory. It does so twice, on a
fresh server each time: armed Corral's way, and armed with nats-py's ``unsubscribe(limit=1)``, which
drops a second delivery that the server sent before it read the limit; a request so dropped is
counted "unanswered" (no answer within 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats
import nats.errors
from corral.runtime.natsserver import NatsServer
from corral.runtime.singleshot import SingleShots
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bench.common import free_port, loop_name, machine, percentile, rss_bytes, run, table

SUBJECT, GROUP = "work", "claimers"
SAMPLE_S = 30.0  # how often the churn run reads nats-server's RSS
PLAIN, CORRAL, NATS_PY = "plain", "corral", "nats-py"  # how a subscriber holds its claim


@contextlib.asynccontextmanager
async def claimers(url: str, n: int, way: str) -> AsyncIterator[NATS]:
    """``n`` subscribers on the queue group, each on its own connection, holding their claim
    ``way`` (re-armed after each delivery unless `PLAIN`); yields a connection to send requests on."""
    conns: list[NATS] = []
    shots: list[SingleShots] = []

    async def subscriber() -> None:
        nc = await nats.connect(url)
        conns.append(nc)
        armed: dict[int, Subscription] = {}
        shot = SingleShots(nc)
        shots.append(shot)

        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, b"ok")
            if way == NATS_PY:
                await arm()
            elif way == CORRAL and (sub := armed.pop(msg.sid, None)) is not None:
                await shot.spent(sub)  # a second delivery to the same subscription arms nothing
                await arm()

        async def arm() -> None:
            if way == CORRAL:
                sub = await shot.arm(SUBJECT, GROUP, answer)
                armed[sub._id] = sub
                return
            sub = await nc.subscribe(SUBJECT, queue=GROUP, cb=answer)
            if way == NATS_PY:
                await sub.unsubscribe(1)

        await arm()

    try:
        for i in range(0, n, 50):
            await asyncio.gather(*(subscriber() for _ in range(min(50, n - i))))
        requester = await nats.connect(url)
        conns.append(requester)
        yield requester
    finally:
        for shot in shots:
            await shot.close()
        for nc in conns:
            await nc.close()


async def measure(url: str, n: int, way: str, requests: int) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``requests`` requests to ``n`` subscribers, one at a time."""
    async with claimers(url, n, way) as requester:
        for _ in range(min(200, requests)):  # warm-up
            await requester.request(SUBJECT, b"x", timeout=5)
        took = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await requester.request(SUBJECT, b"x", timeout=5)
            took.append((time.perf_counter() - t0) * 1000)
        return percentile(took, 50), percentile(took, 99)


async def churn(server: NatsServer, n: int, way: str, minutes: float, concurrency: int = 16) -> int:
    """Requests to ``n`` claimers re-armed ``way`` for ``minutes``, ``concurrency`` at a time (one
    that finds every claim taken is sent again), printing nats-server's RSS every `SAMPLE_S`;
    returns how many went unanswered."""
    pid = server.pid
    assert pid is not None
    async with claimers(server.url, n, way) as requester:
        done = unanswered = 0  # unanswered: a delivery whose claimer did not answer within 1 s
        start = time.monotonic()
        stop = start + minutes * 60

        def line(at: str) -> str:
            mib = rss_bytes(pid) / (1 << 20)
            return f"  [{at}] {done:>9,} requests ({unanswered} unanswered), nats-server RSS {mib:.1f} MiB"

        async def client() -> None:
            nonlocal done, unanswered
            while time.monotonic() < stop:
                try:
                    await requester.request(SUBJECT, b"x", timeout=1)
                    done += 1
                except nats.errors.NoRespondersError:  # every claim taken this instant: again
                    pass
                except nats.errors.TimeoutError:
                    unanswered += 1

        async def sampler() -> None:
            while True:
                print(line(f"{time.monotonic() - start:5.0f} s"), flush=True)
                await asyncio.sleep(SAMPLE_S)  # a sampling period, not a wait for an event

        sampling = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(client() for _ in range(concurrency)))
        finally:
            sampling.cancel()
        print(line("  end"), flush=True)
        return unanswered


async def amain(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}; {loop_name()}", flush=True)
    rows = []
    for way in (PLAIN, CORRAL):
        figures = []
        for n in (args.small, args.subscribers):
            server = NatsServer(port=free_port())
            await server.start()
            try:
                figures.append(await measure(server.url, n, way, args.requests))
            finally:
                await server.stop()
        (a50, a99), (b50, b99) = figures
        kind = "single-shot, armed again" if way == CORRAL else "plain queue subscription"
        rows.append([kind, f"{a50:.3f}", f"{b50:.3f}", f"{a99:.3f}", f"{b99:.3f}", f"{b50 / a50:.2f}x"])
    n, m = args.small, args.subscribers
    header = ["subscribers", f"p50 ms, {n}", f"p50 ms, {m}", f"p99 ms, {n}", f"p99 ms, {m}", "p50 ratio"]
    print(table(header, rows))
    if args.churn_minutes > 0:
        lost = {}
        for way in (CORRAL, NATS_PY):
            print(
                f"claim churn: {args.churn_subscribers} claimers re-armed the {way} way, c=16,"
                f" {args.churn_minutes:g} min"
            )
            server = NatsServer(port=free_port())
            await server.start()
            try:
                lost[way] = await churn(server, args.churn_subscribers, way, args.churn_minutes)
            finally:
                await server.stop()
        print(f"unanswered: {lost[CORRAL]} armed the corral way, {lost[NATS_PY]} the nats-py way")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000, help="the large queue group (default 1000)")
    p.add_argument("--small", type=int, default=10, help="the small one compared with (default 10)")
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000)")
    p.add_argument(
        "--churn-minutes",
        type=float,
        default=0.0,
        help="then load re-armed claimers this long, printing nats-server's RSS (default 0: no)",
    )
    p.add_argument("--churn-subscribers", type=int, default=4, help="claimers in the churn run (default 4)")
    return run(amain(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
