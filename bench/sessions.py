"""What the sessions cache costs nats-server: its RSS as the sessions bucket fills with distinct
conversations, against the same number of writes to a steady working set.

    .venv/bin/python -m bench.sessions [--keys N] [--working-set 512]

The gateway writes one small entry per conversation (`corral.gateway.sessions`) to the sessions
bucket, made as every Corral service makes it (`corral.runtime.buckets.ensure_buckets`: memory
storage, a TTL, a byte bound past which the oldest entries go). Each run starts its own embedded
nats-server on 127.0.0.1 and writes entries as the gateway does (a 24-hex-digit key, an agent id as
the value): first ``--keys`` distinct keys (default: 20 % past what the bound holds), then, on a
fresh server, as many writes over ``--working-set`` keys. It prints nats-server's RSS as each
fills, and what one remembered conversation costs it.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import nats
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import BUCKETS, ensure_buckets
from corral.runtime.natsserver import NatsServer

from bench.common import free_port, loop_name, machine, rss_bytes, run, table

AGENT = b"gpu-host-07-nvidia-0"  # a value as long as a typical agent id
STEPS = 10  # RSS samples per fill
MiB = 1 << 20


def key(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=12).hexdigest()  # as the gateway's keys


async def fill(writes: int, distinct: int | None) -> list[list[str]]:
    """Write ``writes`` entries (over ``distinct`` keys, or each anew) to a fresh server's sessions
    bucket; rows of (writes, entries held, stored MiB, nats-server RSS MiB, RSS per entry)."""
    rows = []
    async with NatsServer(port=free_port()) as server:
        pid = server.pid
        assert pid is not None
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            subjects = Subjects("corral")
            kv = (await ensure_buckets(js, subjects)).sessions
            stream = f"KV_{subjects.sessions_bucket}"
            empty = rss_bytes(pid)
            step = max(writes // STEPS, 1)
            for i in range(writes):
                await kv.put(key(i % distinct if distinct else i), AGENT)
                if (i + 1) % step == 0 or i + 1 == writes:
                    state = (await js.stream_info(stream)).state
                    rss = rss_bytes(pid)
                    per = (rss - empty) / state.messages if state.messages else 0.0
                    rows.append(
                        [
                            f"{i + 1:,}",
                            f"{state.messages:,}",
                            f"{state.bytes / MiB:.2f}",
                            f"{rss / MiB:.1f}",
                            f"{per:.0f}",
                        ]
                    )
        finally:
            await nc.close()
    return rows


async def amain(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}; {loop_name()}", flush=True)
    bound = BUCKETS["sessions"].max_bytes
    writes = args.keys or int(bound / 70 * 1.2)  # an entry is about 70 bytes stored
    header = ["writes", "entries held", "stored MiB", "nats-server RSS MiB", "RSS bytes per entry"]
    t0 = time.monotonic()
    each_anew = await fill(writes, None)
    print(f"every write a new conversation (bucket bound {bound / MiB:g} MiB):")
    print(table(header, each_anew))
    steady = await fill(writes, args.working_set)
    print(f"the same writes over {args.working_set} conversations:")
    print(table(header, steady))
    grown, flat = float(each_anew[-1][3]), float(steady[-1][3])
    print(
        f"nats-server at the end: {grown:.1f} against {flat:.1f} MiB ({grown / flat:.2f}x); {time.monotonic() - t0:.0f} s"
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--keys", type=int, default=0, help="distinct conversations (default: 20 %% past the bound)"
    )
    p.add_argument(
        "--working-set", type=int, default=512, help="the steady run's conversations (default 512)"
    )
    return run(amain(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
