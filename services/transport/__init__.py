"""The transport: a request over NATS and its reply stream, large-body serving, fan-outs; shared by
the gateway, the registry, the CLI and the direct client. No routing decisions live here.

`corral.transport.calls` (`Transport`: the reply mux, calls, attempts), `corral.transport.reply`
(`Reply`, which owns its call), `corral.transport.fanout` (`fan_out`), `corral.transport.bodies`
(large bodies), `corral.transport.request` (`WorkRequest`)."""

from corral.transport.calls import Transport
from corral.transport.fanout import fan_out
from corral.transport.reply import Call, Failure, Outcome, Reply
from corral.transport.request import WorkRequest, model_work

__all__ = ["Call", "Failure", "Outcome", "Reply", "Transport", "WorkRequest", "fan_out", "model_work"]
