"""NATS header names. Requests carry the Ollama body verbatim as payload; these carry the rest
(`corral.protocol.envelope` builds and validates them as one value).

Work message (gateway → agent)::

    Corral-Request        request id (token-safe)
    Corral-Endpoint       Ollama path, e.g. /api/chat, /v1/chat/completions
    Corral-Method         HTTP method (POST unless said)
    Corral-Deadline       unix time in ms after which the agent drops the request unstarted
    Corral-Model          the model's subject token, for the agent's slot accounting
    Corral-Echo-Model     when the gateway stripped a vendor pin: the name to restore in responses
    Corral-Upstream-Model the name Ollama sees (pairs with Corral-Echo-Model)
    Corral-Body-Size      set when the body exceeds the payload limit or is still arriving at the
                          sender (a blob upload): fetch it from the body subject, chunk by chunk
    Corral-Origin         with Corral-Body-Size: the sender's id (its body subject serves the bytes)
    Corral-Num-Ctx        the request's own options.num_ctx, when it gives one
    Corral-Now            on a direct send: start it on a free slot now or answer busy, never wait
                          in the agent's FIFO (the sender's view showed a free slot; it may be old)
    Corral-Reply          on a request waiting in the overflow queue: the reply subject (JetStream
                          keeps headers, not the publisher's reply subject)
    traceparent/tracestate W3C trace context

Reply stream (agent → gateway, on the work message's reply subject), in order:

    claim  Corral-Kind: claim, Corral-Agent: <id>        sent at once when an agent takes the work
    ping   Corral-Kind: ping                              while Ollama has not answered (loading)
    head   Corral-Kind: head, Corral-Status, Corral-Content-Type; payload = first body bytes
    data   no headers at all; payload = the next body bytes (the cheap, frequent message)
    end    Corral-Kind: end, Corral-Seq: <number of data messages>; optional Corral-Error(-Code),
           and Corral-Stopping: 1 when the service copy that answered is stopping (a registry):
           the same request sent again reaches another copy
    busy   Corral-Kind: busy                              the agent cannot take it; try elsewhere

A ``head`` with ``Corral-End: 1`` is also the end (the whole response fit in one message).

Body chunks (receiver → sender on ``body.{origin}.{rid}``, request/reply; `corral.transport.bodies`):

    request  payload = the byte offset wanted, as decimal text
    reply    Corral-Body-Size: <size>; payload = the bytes from that offset (one chunk), or empty with
             Corral-Kind: ping ("not yet": ask again for the same offset), or empty with
             Corral-Error(-Code) (the body cannot be served: give up)
"""

from __future__ import annotations

from typing import Final

REQUEST: Final = "Corral-Request"
ENDPOINT: Final = "Corral-Endpoint"
METHOD: Final = "Corral-Method"
DEADLINE: Final = "Corral-Deadline"
MODEL: Final = "Corral-Model"
ECHO_MODEL: Final = "Corral-Echo-Model"
UPSTREAM_MODEL: Final = "Corral-Upstream-Model"
BODY_SIZE: Final = "Corral-Body-Size"
ORIGIN: Final = "Corral-Origin"
REPLY: Final = "Corral-Reply"
NUM_CTX: Final = "Corral-Num-Ctx"  # set when the request gives options.num_ctx (value: that number)
NOW: Final = "Corral-Now"  # a direct send that starts on a free slot or is answered busy
STREAM: Final = "Corral-Stream"  # the body asks Ollama to stream its answer (a silence is bounded)
UNLOAD: Final = "Corral-Unload"  # set on a keep_alive 0 unload: the agent re-reads its Ollama after it
WINDOW: Final = (
    "Corral-Window"  # request: read the reply in windows of this many bytes; head: the sender keeps to it
)
READ: Final = "Corral-Read"  # a read control: the reply's body bytes its requester has taken so far
KEEP_ALIVE: Final = (
    "Corral-Keep-Alive"  # the request names a keep_alive: the agent re-reads its Ollama after it
)

KIND: Final = "Corral-Kind"
AGENT: Final = "Corral-Agent"
STATUS: Final = "Corral-Status"
CONTENT_TYPE: Final = "Corral-Content-Type"
SEQ: Final = "Corral-Seq"
END: Final = "Corral-End"
ERROR: Final = "Corral-Error"
ERROR_CODE: Final = "Corral-Error-Code"
STOPPING: Final = "Corral-Stopping"  # end: its sender is stopping; another copy may take the request

CTL: Final = "Corral-Ctl"

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

# reply kinds
CLAIM: Final = "claim"
PING: Final = "ping"
HEAD: Final = "head"
END_KIND: Final = "end"
BUSY: Final = "busy"

# control kinds (Corral-Ctl on {root}.agent.{id}.ctl)
CANCEL: Final = "cancel"
READ_CTL: Final = "read"  # from the requester: it has taken Corral-Read bytes of the reply
DRAIN: Final = "drain"
CORDON: Final = "cordon"
UNCORDON: Final = "uncordon"

# the nats-server's own status header (no responders = 503)
NATS_STATUS: Final = "Status"
