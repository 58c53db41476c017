"""Large bodies: a request body too big for one NATS message stays with its sender, which serves it
in chunks to the agent that took the request (``body.{sender}.{rid}``, the offset as the data)."""

from __future__ import annotations

from corral.protocol import headers as H
from corral.protocol.envelope import HEADER_HEADROOM
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg


class LargeBodies:
    """The bodies of this sender's calls that were too large to publish, by request id."""

    __slots__ = ("_bodies", "_nc", "_prefix")

    def __init__(self, nc: NATS, prefix: int) -> None:
        self._nc = nc
        self._bodies: dict[str, bytes] = {}
        self._prefix = prefix  # length of the body subject before the request id

    def keep(self, rid: str, body: bytes) -> None:
        self._bodies[rid] = body

    def drop(self, rid: str) -> None:
        self._bodies.pop(rid, None)

    async def serve(self, msg: Msg) -> None:
        """Answer one chunk request: the body from the offset asked, as much as fits."""
        body = self._bodies.get(msg.subject[self._prefix :])
        if body is None or not msg.reply:
            return
        offset = int(msg.data or b"0")
        chunk = self._nc.max_payload - HEADER_HEADROOM
        await self._nc.publish(
            msg.reply, body[offset : offset + chunk], headers={H.BODY_SIZE: str(len(body))}
        )
