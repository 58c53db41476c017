"""A preload: Ollama's empty generate (load the model, run nothing; for an embedding model, which
refuses generate, an empty embed) sent straight to one agent, then a bounded wait until the fleet
shows what it was for. Pinned models (`corral.registry.pins`) and demand-driven replicas
(`corral.registry.replicas`) both place theirs with it."""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
from corral.protocol.errors import CorralError
from corral.protocol.names import key_of, parse_name
from corral.routing.route import Route, warm
from corral.runtime.fleet import FleetView
from corral.transport import Transport, WorkRequest

_enc = msgspec.json.Encoder()
NO_GENERATE = b"does not support generate"  # Ollama's 400 for an embedding-only model


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
    embeds_only = _embeds_only(fleet, agent_id, key)
    status, data = await _load(
        transport, agent_id, "/api/embed" if embeds_only else "/api/generate", order, timeout
    )
    if status == 400 and NO_GENERATE in data:  # an embedding model its Ollama did not say is one
        status, data = await _load(transport, agent_id, "/api/embed", order, timeout)
    if status != 200:
        raise CorralError(f"HTTP {status}: {data[:200].decode(errors='replace')}")
    deadline = time.monotonic() + settle_s
    while not shown() and (left := deadline - time.monotonic()) > 0:
        await fleet.wait_changed(left)


def serves(fleet: FleetView, agent_id: str, key: str) -> bool:
    """Whether the fleet shows agent ``agent_id`` serving model ``key`` (a warm default runner): what
    a preload's ``shown`` waits for."""
    agent = fleet.get(agent_id)
    return agent is not None and warm(Route(key=key), agent)


def _embeds_only(fleet: FleetView, agent_id: str, key: str) -> bool:
    """Whether the agent's Ollama lists model ``key`` as an embedding model (``capabilities`` in its
    /api/tags, given by newer Ollamas), which refuses generate: an empty embed loads it."""
    state = fleet.get(agent_id)
    for m in state.models if state is not None else ():
        if key_of(m.name) == key and isinstance(m.capabilities, list):
            return "embedding" in m.capabilities and "completion" not in m.capabilities
    return False


async def _load(
    transport: Transport, agent_id: str, endpoint: str, order: dict[str, object], timeout: float
) -> tuple[int, bytes]:
    """One load-only request (no prompt, no input) to one agent: its status and body."""
    work = WorkRequest(endpoint, _enc.encode(order), model=parse_name(str(order["model"])))
    async with await transport.send_to(agent_id, work, timeout=timeout) as reply:
        return reply.status, await reply.read()
