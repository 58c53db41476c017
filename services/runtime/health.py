"""Readiness: whether this process can serve through NATS right now.

Ready means the NATS connection is up and JetStream answers a cheap call within a short timeout:
the info of a stream the process reads, which every NATS identity of the fleet may ask for (the
account's info is the operator's alone). A process that is not ready is still alive: the connection reconnects by
itself, so an orchestrator should take it out of rotation (readiness), not restart it (liveness).
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError

READY_TIMEOUT_S = 1.0  # JetStream must answer within this


async def not_ready(nc: NATS | None, stream: str, *, timeout: float = READY_TIMEOUT_S) -> str | None:
    """What keeps ``nc`` from serving (in words), or None when it is ready; ``stream``: the one
    whose info JetStream is asked for (a missing stream is an answer too)."""
    if nc is None:
        return "not connected to NATS yet"
    if nc.is_closed:
        return "the NATS connection is closed"
    if not nc.is_connected:
        return "disconnected from NATS (reconnecting)"
    try:
        await nc.jetstream(timeout=timeout).stream_info(stream)
    except NotFoundError:
        return None  # JetStream answered
    except (NatsError, JetStreamError, TimeoutError) as e:
        return f"JetStream is not reachable through NATS: {str(e) or type(e).__name__}"
    return None
