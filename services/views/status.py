"""``/api/status``: the fleet at a glance, which no single Ollama server can show, and the
aggregator's rolling figures. Pure functions over agent states."""

from __future__ import annotations

import time

import msgspec
from corral.protocol.messages import AgentState, Gpu
from corral.protocol.names import decode_token, key_of
from corral.views.catalog import merged_tags

_enc = msgspec.json.Encoder()

# The aggregator's entries in the views bucket. ``rates`` is the small part only it knows, kept
# apart so readers that want just the figures (every gateway) never decode the whole fleet.
STATUS_KEY = "status"
RATES_KEY = "rates"


class LoadedModel(msgspec.Struct, frozen=True):
    model: str
    size: int
    size_vram: int
    context_length: int
    expires_at: str
    busy: bool = False  # requests of it hold slots on its agent now, or ended within one request time


class AgentRow(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's row of ``/api/status``; its attributes are the row's JSON fields (no logic)."""

    id: str
    vendor: str
    host: str
    status: str
    ollama_url: str
    ollama_version: str
    ollama_down: bool  # the agent cannot read its Ollama: it offers nothing until it can
    gpus: list[Gpu]
    vram_total: int
    vram_free: int
    models_on_disk: int
    loaded: list[LoadedModel]
    parallel: int
    slots: int  # ``parallel`` per runner, for the models loaded or busy there: what ``in_flight`` fills
    in_flight: int
    queued: int
    up_s: float
    last_seen_s: float


class ModelRate(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    errors: int
    tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft_ms_p50: float | None = None
    ttft_ms_p95: float | None = None


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """Rolling figures over the last ``window_s`` seconds, from request-finished events."""

    window_s: float
    requests: int
    errors: int
    tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft_ms_p50: float | None = None
    ttft_ms_p95: float | None = None
    per_model: dict[str, ModelRate] = msgspec.field(default_factory=dict)
    every_s: float = 0.0  # how often its aggregator rewrites them (0: not said)


STALE_REWRITES = 5  # rates not rewritten for this many of their aggregator's periods: it stopped


def current(rates: Rates | None, age_s: float) -> Rates | None:
    """``rates`` last written ``age_s`` seconds ago, or None when their aggregator has stopped
    rewriting them (a dead aggregator's last figures would otherwise show for good)."""
    if rates is None or (rates.every_s > 0 and age_s > STALE_REWRITES * rates.every_s):
        return None
    return rates


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    agents: int
    active: int
    gpus: int
    vram_total: int
    vram_free: int
    models: int
    loaded: int
    in_flight: int
    queued: int  # waiting at agents and in the fleet-wide queue
    waiting: int = 0  # of which in the fleet-wide queue


class Pin(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A model kept warm (``corral pin``): the registry keeps it loaded, with ``keep_alive: -1``,
    on ``replicas`` live agents (of ``vendor`` only, when one is named)."""

    replicas: int = 1
    vendor: str | None = None


class PinRow(msgspec.Struct, frozen=True, kw_only=True):
    """A pin of ``/api/status``: the replicas wanted, and the active agents that have it loaded."""

    model: str
    replicas: int
    vendor: str | None
    loaded: int
    agents: list[str]


class Cloud(msgspec.Struct, frozen=True, kw_only=True):
    """Ollama's own ``/api/status`` (0.16.2+): whether cloud models are disabled, and by what.
    Corral disables none itself (each Ollama behind it decides for the requests it is sent), so it
    answers Ollama's default, and clients that read it see a well-formed answer."""

    disabled: bool = False
    source: str = "none"


class FleetStatus(msgspec.Struct, frozen=True, kw_only=True):
    totals: Totals
    agents: list[AgentRow]
    rates: Rates | None = None  # None when no aggregator is running
    queue: dict[str, int] = msgspec.field(default_factory=dict)  # model → waiting in the fleet queue
    at: float = 0.0
    pins: list[PinRow] = msgspec.field(default_factory=list)
    cloud: Cloud = Cloud()  # Ollama's own answer to GET /api/status, beside the fleet's
    # seconds the gateway answering has been cut off from NATS (None: connected); meanwhile the
    # rest is the fleet as it last saw it, and model requests fail
    nats_away_s: float | None = None


def pinned_on(key: str, pin: Pin, agents: list[AgentState]) -> list[str]:
    """The active agents (of the pin's vendor) with a runner of model ``key``, by id."""
    return sorted(
        a.id
        for a in agents
        if a.status == "active"
        and (pin.vendor is None or a.vendor == pin.vendor)
        and any(key_of(m.name) == key for m in a.loaded)
    )


def pin_rows(pins: dict[str, Pin], agents: list[AgentState]) -> list[PinRow]:
    rows = []
    for key, pin in sorted(pins.items()):
        on = pinned_on(key, pin, agents)
        rows.append(PinRow(model=key, replicas=pin.replicas, vendor=pin.vendor, loaded=len(on), agents=on))
    return rows


def queue_by_token(depths: dict[str, int]) -> dict[str, int]:
    """Fleet-queue depths per model token (its vendor and batch lanes together), from
    `corral.runtime.workqueue.depths` (per subject)."""
    out: dict[str, int] = {}
    for subject, n in depths.items():
        token = subject.rsplit(".", 1)[-1]
        out[token] = out.get(token, 0) + n
    return out


def queue_by_model(depths: dict[str, int]) -> dict[str, int]:
    """Fleet-queue depths per model key (`queue_by_token`, its tokens decoded)."""
    return dict(sorted((decode_token(token), n) for token, n in queue_by_token(depths).items()))


def status_view(
    agents: list[AgentState],
    rates: Rates | None = None,
    now: float | None = None,
    queue: dict[str, int] | None = None,
    pins: dict[str, Pin] | None = None,
    nats_away_s: float | None = None,
) -> FleetStatus:
    """``queue``: model key → requests waiting in the fleet-wide queue (`queue_by_model`);
    ``pins``: the models kept warm, by key (the policy record's); ``nats_away_s``: how long the
    gateway has been cut off from NATS (None: it is not)."""
    now = time.time() if now is None else now
    queue = queue or {}
    waiting = sum(queue.values())
    rows = [_agent_row(a, now) for a in sorted(agents, key=lambda a: a.id)]
    totals = Totals(
        agents=len(rows),
        active=sum(1 for r in rows if r.status == "active"),
        gpus=sum(len(r.gpus) for r in rows),
        vram_total=sum(r.vram_total for r in rows),
        vram_free=sum(r.vram_free for r in rows),
        models=len(merged_tags(agents)),
        loaded=sum(len(r.loaded) for r in rows),
        in_flight=sum(r.in_flight for r in rows),
        queued=sum(r.queued for r in rows) + waiting,
        waiting=waiting,
    )
    return FleetStatus(
        totals=totals,
        agents=rows,
        rates=rates,
        queue=queue,
        at=now,
        pins=pin_rows(pins or {}, agents),
        nats_away_s=None if nats_away_s is None else round(nats_away_s, 1),
    )


def _agent_row(a: AgentState, now: float) -> AgentRow:
    # Ollama runs ``parallel`` requests per loaded model: an agent with two busy models has twice
    # the slots (a request waiting inside Ollama for a model swap counts among them)
    busy = set(a.busy_models)
    runners = {k for m in a.loaded if (k := key_of(m.name)) is not None}
    return AgentRow(
        id=a.id,
        vendor=a.vendor,
        host=a.host,
        status=a.status,
        ollama_url=a.ollama_url,
        ollama_version=a.ollama_version,
        ollama_down=a.ollama_down,
        gpus=list(a.gpus),
        vram_total=sum(g.vram_total for g in a.gpus),
        vram_free=sum(g.vram_free for g in a.gpus),
        models_on_disk=sum(1 for m in a.models if key_of(m.name) is not None),
        loaded=[
            LoadedModel(m.name, m.size, m.size_vram, m.context_length, m.expires_at, key in busy)
            for m in a.loaded
            if (key := key_of(m.name)) is not None
        ],
        parallel=a.parallel,
        slots=a.parallel * max(1, len(runners | busy)),
        in_flight=a.in_flight,
        queued=a.queued,
        up_s=round(max(now - a.started_at, 0.0), 3) if a.started_at else 0.0,
        last_seen_s=round(max(now - a.updated_at, 0.0), 3),
    )


def status_body(
    agents: list[AgentState],
    rates: Rates | None = None,
    queue: dict[str, int] | None = None,
    pins: dict[str, Pin] | None = None,
    nats_away_s: float | None = None,
) -> bytes:
    return _enc.encode(status_view(agents, rates, queue=queue, pins=pins, nats_away_s=nats_away_s))


rates_decoder = msgspec.json.Decoder(Rates)
