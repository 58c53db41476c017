"""The gateway's settings: each declared once (type, default, doc); flags and env vars derive from it."""

from __future__ import annotations

from typing import Annotated, Literal

from corral.protocol.subjects import GATEWAY_ID_PATTERN
from corral.runtime.settings import CommonSettings, setting
from corral.runtime.workqueue import MAX_AGE_S

# the routing strategies a request may name (a test checks them against the routing module's)
Strategy = Literal["auto", "round_robin", "random", "least_connection", "vram", "affinity"]


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    """One attribute per setting: each is a documented flag and environment variable, so the
    gateway's many attributes are its configuration surface, not state."""

    gateway_id: Annotated[
        str,
        setting(
            "this gateway's token in its reply and body subjects, unique in the fleet; up to 64 letters, "
            "digits, _ and -, not `registry` (with NATS identities: its own, from `corral auth gateway`)",
            pattern=GATEWAY_ID_PATTERN,
            shown="random",
        ),
    ] = ""
    host: Annotated[str, setting("address to listen on (0.0.0.0 for all)")] = "127.0.0.1"
    origins: Annotated[
        str,
        setting(
            "browser origins allowed besides the local ones, comma-separated globs as OLLAMA_ORIGINS "
            "(https://*.example.com; * for any)",
            shown="none",
        ),
    ] = ""
    port: Annotated[int, setting("port to listen on (Ollama's by default)", ge=0, le=65535)] = 11434
    claim_timeout_s: Annotated[
        float, setting("an agent must claim a request within this, or the next one is tried", gt=0)
    ] = 2.0
    warm_claim_timeout_s: Annotated[
        float,
        setting(
            "a request offered to every free slot of its model must be claimed within this, or it "
            "goes to the fleet queue (on a NATS cluster one can be dropped unseen)",
            gt=0,
        ),
    ] = 0.5
    idle_timeout_s: Annotated[
        float, setting("a claimed request silent this long means its agent died", gt=0)
    ] = 10.0
    queue_timeout_s: Annotated[
        float,
        setting(
            "how long a request may wait for capacity before 503 (at most the queue's hour)",
            ge=0,
            le=MAX_AGE_S,
            flags=["--queue-timeout"],
        ),
    ] = 600.0  # Ollama waits without a bound; a fleet that is busy for minutes still serves in turn
    ollama_version: Annotated[str, setting("/api/version when no backend reports one")] = "0.12.3"
    strategy: Annotated[
        Strategy, setting("routing when a request names none (X-Load-Balancing-Strategy)")
    ] = "auto"
    queue: Annotated[
        bool, setting("auto: wait for a slot in the fleet-wide queue (--no-queue: at the agents)")
    ] = True
    nats_outage_s: Annotated[
        float,
        setting(
            "a waiting request ends with 503 once this gateway has been cut off from NATS this long "
            "(0: waits until its queue deadline)",
            ge=0,
        ),
    ] = 10.0
    queue_depth: Annotated[
        int, setting("requests that may wait per model (and vendor pin) before 503 at once", ge=0)
    ] = 512
    queue_max_bytes: Annotated[
        int,
        setting("bytes the fleet-wide queue may hold, all models together (on disk), before 503", ge=1024),
    ] = 1 << 30
    sessions: Annotated[
        bool, setting("auto: send a conversation's follow-up turns to the agent holding its prompt cache")
    ] = True
    load_grace_s: Annotated[
        float,
        setting(
            "a load just started counts as under way this long before its agent shows it; "
            "a failed one's loading state is not believed for as long",
            ge=0,
            period=True,
        ),
    ] = 1.0
    queue_recheck_s: Annotated[
        float,
        setting("how often a queued request checks that an agent still serves its model", gt=0, period=True),
    ] = 1.0
    batch_aging_s: Annotated[
        float,
        setting(
            "a batch-priority request waiting in the fleet queue's batch lane this long moves to the "
            "end of the interactive lane (the bound on how long interactive work can starve it)",
            gt=0,
            flags=["--batch-aging"],
        ),
    ] = 30.0
    batch_in_flight: Annotated[
        int,
        setting(
            "Batch API: lines running at once, fleet-wide (the shared consumer's bound; a gateway "
            "that starts with another value sets it for all)",
            ge=1,
        ),
    ] = 64
    batch_slots: Annotated[int, setting("Batch API: lines this gateway runs at once", ge=1)] = 16
    batch_attempts: Annotated[
        int,
        setting(
            "Batch API: runs of a line that fail transiently (503, agent gone) before it is an error line",
            ge=1,
        ),
    ] = 5
    batch_ack_wait_s: Annotated[
        float,
        setting("Batch API: a line whose gateway went silent this long (it died) runs again elsewhere", gt=0),
    ] = 10.0
    batch_max_lines: Annotated[int, setting("Batch API: requests one input file may hold", ge=1)] = 50_000
    auto_pull: Annotated[
        bool, setting("a request for a model no agent has pulls it onto one agent first")
    ] = False
    max_body_bytes: Annotated[
        int,
        setting(
            "largest request body before 413; bodies are held in memory (blob uploads with a Content-Length stream past it)",
            ge=1,
        ),
    ] = 256 * 1024 * 1024
    max_bodies_bytes: Annotated[
        int,
        setting(
            "request bodies all requests together may hold in memory, counted as their bytes arrive, "
            "before 503 server busy",
            ge=1,
        ),
    ] = 1024 * 1024 * 1024
    max_requests: Annotated[
        int, setting("requests with a body (POST, DELETE) served at once before 503 server busy", ge=1)
    ] = 1024
    header_timeout_s: Annotated[
        float,
        setting(
            "a request's headers must arrive whole within this of its first byte, or the connection closes",
            gt=0,
        ),
    ] = 10.0
    body_timeout_s: Annotated[
        float,
        setting(
            "a request body must arrive whole within this (a streamed blob upload: each piece), or 408", gt=0
        ),
    ] = 60.0
    reply_buffer_bytes: Annotated[
        int,
        setting("reply bytes one request may hold unread; past it the request is cancelled", ge=1),
    ] = 32 * 1024 * 1024
    auth: Annotated[
        Literal["off", "keys"],
        setting("keys: every request needs an API key made by `corral keys create` (off: anyone may)"),
    ] = "off"
    tls_cert: Annotated[
        str, setting("certificate (PEM) to serve HTTPS with; with --tls-key", shown="none: HTTP")
    ] = ""
    tls_key: Annotated[str, setting("the private key (PEM) of --tls-cert", shown="none")] = ""
    quant_fallback: Annotated[
        bool,
        setting(
            "a request for a model no agent has may be served by a loaded model of the same name and "
            "size in another quantisation (named in X-Corral-Model)"
        ),
    ] = False
    fallback_after_s: Annotated[
        float,
        setting(
            "a model with fallbacks (`corral fallback`) that cannot start within this goes to the next one",
            gt=0,
        ),
    ] = 10.0
