"""The transport: a request over NATS and its reply stream, large-body serving, fan-outs; shared by
the gateway, the registry, the CLI and the direct client. No routing decisions live here.

`corral.transport.calls` (`Transport`: the reply mux, calls, attempts), `corral.transport.reply`
(`Reply`, which owns its call), `corral.transport.fanout` (`fan_out`), `corral.transport.bodies`
(large bodies), `corral.transport.request` (`WorkRequest`), `corral.transport.resend`
(`send_resending`: a request sent again when the service copy serving it stops)."""

from corral.transport.calls import Transport
from corral.transport.fanout import fan_out
from corral.transport.reply import Call, Failure, Outcome, Reply, ReplyStream
from corral.transport.request import WorkRequest, model_work
from corral.transport.resend import send_resending

__all__ = [
    "Call",
    "Failure",
    "Outcome",
    "Reply",
    "ReplyStream",
    "Transport",
    "WorkRequest",
    "fan_out",
    "model_work",
    "send_resending",
]
