"""Merged views of the fleet: tags, ps, /v1/models and version as one Ollama server would show
them, and ``/api/status``, the fleet at a glance, which no single server can show.

Pure functions over agent states (the gateway's KV watch cache, the aggregator's, the CLI's).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import msgspec
from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel
from corral.protocol.names import decode_token, parse_name

_enc = msgspec.json.Encoder()
_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_time(value: str) -> float:
    """RFC3339 with Go's nanoseconds → unix seconds (0 when unparseable)."""
    try:
        dt = datetime.fromisoformat(_FRACTION.sub(r"\1", value).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _key(name: str) -> str:
    try:
        return parse_name(name).key
    except Exception:
        return name.lower()


class _Tags(msgspec.Struct):
    models: list[TagModel]


class Placement(msgspec.Struct, frozen=True):
    """Where a ``/api/ps`` row runs; an extra field Ollama clients ignore."""

    agent: str
    vendor: str
    host: str


class PsRow(PsModel, frozen=True, kw_only=True):
    corral: Placement


class _Ps(msgspec.Struct):
    models: list[PsRow]


def merged_tags(agents: list[AgentState]) -> list[TagModel]:
    """One entry per model (newest ``modified_at`` wins), sorted newest first like Ollama."""
    best: dict[str, tuple[float, TagModel]] = {}
    for a in agents:
        for m in a.models:
            k, t = _key(m.name), parse_time(m.modified_at)
            if k not in best or t > best[k][0]:
                best[k] = (t, m)
    return [m for _, m in sorted(best.values(), key=lambda x: x[0], reverse=True)]


def tags_body(agents: list[AgentState]) -> bytes:
    return _enc.encode(_Tags(merged_tags(agents)))


def merged_ps(agents: list[AgentState]) -> list[PsRow]:
    """One entry per agent and model: a model loaded on two servers shows twice, each saying where."""
    rows = [
        PsRow(**msgspec.structs.asdict(m), corral=Placement(a.id, a.vendor, a.host))
        for a in agents
        for m in a.loaded
    ]
    rows.sort(key=lambda m: (-parse_time(m.expires_at), m.corral.agent))
    return rows


def ps_body(agents: list[AgentState]) -> bytes:
    return _enc.encode(_Ps(merged_ps(agents)))


class _V1Model(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class _V1List(msgspec.Struct):
    object: str
    data: list[_V1Model] | None


def _v1(m: TagModel, model_id: str | None = None) -> _V1Model:
    try:
        owner = parse_name(m.name).namespace
    except Exception:
        owner = "library"
    return _V1Model(model_id or m.name, "model", int(parse_time(m.modified_at)), owner)


def v1_models_body(agents: list[AgentState]) -> bytes:
    """OpenAI's list; ``data`` is null when there are no models, as Ollama does (§3.5)."""
    data = [_v1(m) for m in merged_tags(agents)]
    return _enc.encode(_V1List("list", data or None))


def v1_model_body(agents: list[AgentState], model_id: str) -> bytes | None:
    key = _key(model_id)
    for m in merged_tags(agents):
        if _key(m.name) == key:
            return _enc.encode(_v1(m, model_id))
    return None


def fleet_version(agents: list[AgentState], default: str) -> str:
    """The oldest backend version: what every request can rely on."""
    versions = [a.ollama_version for a in agents if a.ollama_version]
    if not versions:
        return default

    def order(v: str) -> tuple[tuple[int, ...], int, str]:
        core, _, pre = v.removeprefix("v").partition("-")
        # a pre-release (0.13.0-rc1) is older than its release (0.13.0)
        return tuple(int(x) if x.isdigit() else 0 for x in core.split(".")), 0 if pre else 1, pre

    return min(versions, key=order)


def now_utc() -> datetime:
    return datetime.now(UTC)


# -- /api/status ---------------------------------------------------------------------------------
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


class AgentRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    vendor: str
    host: str
    status: str
    ollama_url: str
    ollama_version: str
    gpus: list[Gpu]
    vram_total: int
    vram_free: int
    models_on_disk: int
    loaded: list[LoadedModel]
    parallel: int
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


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """Rolling figures over the last ``window_s`` seconds, from request-finished events."""

    window_s: float
    requests: int
    errors: int
    tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft_ms_p50: float | None = None
    per_model: dict[str, ModelRate] = msgspec.field(default_factory=dict)


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


class FleetStatus(msgspec.Struct, frozen=True, kw_only=True):
    totals: Totals
    agents: list[AgentRow]
    rates: Rates | None = None  # None when no aggregator is running
    queue: dict[str, int] = msgspec.field(default_factory=dict)  # model → waiting in the fleet queue
    at: float = 0.0


def queue_by_model(depths: dict[str, int]) -> dict[str, int]:
    """Fleet-queue depths per model key, from `corral.runtime.workqueue.depths` (per subject)."""
    out: dict[str, int] = {}
    for subject, n in depths.items():
        key = decode_token(subject.rsplit(".", 1)[-1])
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items()))


def status_view(
    agents: list[AgentState],
    rates: Rates | None = None,
    now: float | None = None,
    queue: dict[str, int] | None = None,
) -> FleetStatus:
    """``queue``: model key → requests waiting in the fleet-wide queue (`queue_by_model`)."""
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
    return FleetStatus(totals=totals, agents=rows, rates=rates, queue=queue, at=now)


def _agent_row(a: AgentState, now: float) -> AgentRow:
    return AgentRow(
        id=a.id,
        vendor=a.vendor,
        host=a.host,
        status=a.status,
        ollama_url=a.ollama_url,
        ollama_version=a.ollama_version,
        gpus=list(a.gpus),
        vram_total=sum(g.vram_total for g in a.gpus),
        vram_free=sum(g.vram_free for g in a.gpus),
        models_on_disk=len(a.models),
        loaded=[LoadedModel(m.name, m.size, m.size_vram, m.context_length, m.expires_at) for m in a.loaded],
        parallel=a.parallel,
        in_flight=a.in_flight,
        queued=a.queued,
        up_s=round(max(now - a.started_at, 0.0), 3) if a.started_at else 0.0,
        last_seen_s=round(max(now - a.updated_at, 0.0), 3),
    )


def status_body(
    agents: list[AgentState], rates: Rates | None = None, queue: dict[str, int] | None = None
) -> bytes:
    return _enc.encode(status_view(agents, rates, queue=queue))


rates_decoder = msgspec.json.Decoder(Rates)
