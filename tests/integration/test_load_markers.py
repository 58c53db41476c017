"""Load markers expire over real NATS: a client cycling through ``options.num_ctx`` values leaves
no trail of ``loading.*`` markers in the models bucket, nor in the gateway's own map."""

from __future__ import annotations

import time

import ollama
from corral.registry.placement import MARKERS
from corral.runtime.kvwatch import watch
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.js.kv import KeyValue

MODEL = "llama3.2"
CONTEXTS = [2048 + 512 * i for i in range(20)]


async def _markers_fall_to(kv: KeyValue, bound: int, timeout: float) -> int:
    """Wait, woken by each write or delete of a marker (a KV watch, no polling), until at most
    ``bound`` markers are left; how many are."""
    live: set[str] = set()
    watcher = await watch(kv, MARKERS)
    deadline = time.monotonic() + timeout
    synced = False
    try:
        while True:
            if synced and len(live) <= bound:
                return len(live)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return len(live)
            try:
                entry = await watcher.updates(timeout=remaining)
            except TimeoutError:
                return len(live)
            if entry is None:  # the markers there when the watch began have all been read
                synced = True
            elif entry.operation in ("DEL", "PURGE"):
                live.discard(entry.key)
            else:
                live.add(entry.key)
    finally:
        await watcher.stop()


async def test_twenty_contexts_leave_no_trail_of_markers(nats_server: NatsServer, root: str) -> None:
    opts = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, time_scale=0.02),
        agent={"refresh_s": 0.5, "heartbeat_s": 1.0},
        gateway={"queue_timeout_s": 20.0},
        registry={"replica_check_s": 0.0},
    )
    async with LocalFleet(opts) as fleet:
        assert fleet.registry is not None and fleet.gateway is not None
        kv = fleet.registry.placer.kv
        async with ollama.AsyncClient(host=fleet.url) as c:
            for ctx in CONTEXTS:  # each one a load: no runner has that context
                await c.generate(model=MODEL, prompt="hi", options={"num_ctx": ctx, "num_predict": 2})
        assert fleet.registry.placer.loads_started >= len(CONTEXTS) // 2  # the registry marked loads
        assert await _markers_fall_to(kv, 0, timeout=15.0) == 0  # every load is done: no marker left
        # the gateway drops its own done markers as it makes a new one (those younger than the
        # load grace, whose agent may not show the load yet, stay until then): one more load
        # leaves only its own
        async with ollama.AsyncClient(host=fleet.url) as c:
            await c.generate(model=MODEL, prompt="hi", options={"num_ctx": 1024, "num_predict": 2})
        assert fleet.gateway.planner.loads.marked <= 2
