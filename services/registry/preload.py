"""A preload: Ollama's empty generate (load the model, run nothing) sent straight to one agent,
then a bounded wait until the fleet shows what it was for. Pinned models (`corral.registry.pins`)
and demand-driven replicas (`corral.registry.replicas`) both place theirs with it."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
from corral.protocol.errors import CorralError
from corral.protocol.names import parse_name
from corral.runtime.fleet import FleetView
from corral.transport import Transport, WorkRequest

_enc = msgspec.json.Encoder()


async def preload(
    transport: Transport,
    fleet: FleetView,
    agent_id: str,
    key: str,
    *,
    timeout: float,
    shown: Callable[[], bool],
    settle_s: float,
    keep_alive: int | str | None = None,
) -> None:
    """Load model ``key`` on agent ``agent_id`` (with ``keep_alive`` when given; else the agent's
    Ollama default), then wait up to ``settle_s`` until ``shown()`` holds: an agent's state follows a
    load by a refresh, and until then the load counts as under way. Raises `CorralError` for an
    answer other than 200, and the transport's errors (`CorralError`, NATS errors) as they come."""
    order: dict[str, object] = {"model": key}
    if keep_alive is not None:
        order["keep_alive"] = keep_alive
    work = WorkRequest("/api/generate", _enc.encode(order), model=parse_name(key))
    async with await transport.send_to(agent_id, work, timeout=timeout) as reply:
        data = await reply.read()
        if reply.status != 200:
            raise CorralError(f"HTTP {reply.status}: {data[:200].decode(errors='replace')}")
    deadline = time.monotonic() + settle_s
    while not shown() and (left := deadline - time.monotonic()) > 0:
        await fleet.wait_changed(left)
