"""Work intake: a work message's envelope validated into a `Job`, and callbacks that never raise.

A malformed message is a typed error (`BadEnvelope`, code ``bad_request``) answered to its sender
when it names a usable reply subject, else logged and dropped; it never escapes a subscription.

Nor may it stop the connection: nats-py decodes a message's subject and reply subject as strict
UTF-8 in its read loop, and any client may publish a reply subject that is not UTF-8. The error
would end that read loop for good (the connection stays open and reads nothing more), so the agent's
connection decodes them leniently (`corral.runtime.nats.connect`); such a reply subject is never usable.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TypeVar

from corral.agent.worker import Job
from corral.protocol import headers as H
from corral.protocol.endpoints import remote_refused, served
from corral.protocol.envelope import decode_request
from corral.protocol.errors import BadEnvelope, BadRequest
from corral.protocol.subjects import Subjects
from corral.runtime.nats import stream_delivery
from corral.transport.replies import ReplyWriter
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

log = logging.getLogger(__name__)

S = TypeVar("S")


async def job_from(
    msg: Msg, nc: NATS, subjects: Subjects, sender: str, allowed_registries: tuple[str, ...]
) -> Job | None:
    """The job a work message carries; a malformed one is answered ``bad_request`` where it names
    a usable reply subject, else logged and dropped (None either way)."""
    try:
        env = decode_request(msg.headers)
    except BadEnvelope as e:
        reply = (msg.headers or {}).get(H.REPLY) or msg.reply
        if subjects.is_reply(reply):
            log.warning("answering malformed work on %s: %s", msg.subject, e.message)
            await ReplyWriter(nc, reply, "", sender).end(e)
        else:
            log.warning("dropping malformed work on %s: %s", msg.subject, e.message)
        return None
    reply = env.reply or msg.reply  # a queued request names its reply subject in a header
    if not subjects.is_reply(reply):
        log.warning(
            "dropping work %s without a reply subject under %s.reply on %s",
            env.rid,
            subjects.root,
            msg.subject,
        )
        return None
    if not served(env.method, env.endpoint):
        log.warning(
            "refusing work %s: %s %s is not an Ollama endpoint agents serve",
            env.rid,
            env.method,
            env.endpoint,
        )
        await ReplyWriter(nc, reply, env.rid, sender).end(
            BadEnvelope(f"{env.method} {env.endpoint} is not served")
        )
        return None
    refused = remote_refused(env.endpoint, msg.data, allowed_registries) if env.body_size is None else None
    if refused is not None:  # whoever sent it: the gateway checks too, but NATS clients need not
        log.warning("refusing work %s: %s", env.rid, refused)
        await ReplyWriter(nc, reply, env.rid, sender).end(BadRequest(refused))
        return None
    body_subject = ""
    if env.body_size is not None and env.origin is not None:
        body_subject = subjects.body(env.origin, env.rid)
    out = ReplyWriter(nc, reply, env.rid, sender, window=env.window)
    return Job(env=env, subject=msg.subject, body=msg.data, out=out, body_subject=body_subject)


def guarded(handler: Callable[[S, Msg], Awaitable[None]]) -> Callable[[S, Msg], Awaitable[None]]:
    """A subscription callback that never raises: a NATS error answering is logged; anything else
    is a bug, logged with its traceback, and the next message is served as usual. What a JetStream
    consumer delivers there is dropped unread (`corral.runtime.nats.published`)."""

    @wraps(handler)
    async def guarded(self: S, msg: Msg) -> None:
        if stream_delivery(msg):
            return
        try:
            await handler(self, msg)
        except NatsError as e:
            log.warning("%s on %s: %s", handler.__name__, msg.subject, e)
        except Exception:
            log.exception("%s failed on %s", handler.__name__, msg.subject)

    return guarded
