"""Merged views of the fleet: tags, ps, /v1/models and version as one Ollama server would show
them (https://github.com/ollama/ollama/blob/main/docs/api.md).

Pure functions over agent states (the gateway's KV watch cache, the aggregator's, the CLI's). A
model name without a key (`corral.protocol.names.key_of`: not a valid Ollama name) is shown nowhere,
as it is routed nowhere.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import msgspec
from corral.protocol.errors import InvalidModelName
from corral.protocol.messages import AgentState, PsModel, TagModel
from corral.protocol.names import ModelName, key_of, parse_name

_enc = msgspec.json.Encoder()
_FRACTION = re.compile(r"(\.\d{6})\d+")


def listed_as(state: AgentState | None, model: ModelName) -> str:
    """``model`` as the agent that served it (``state``) lists it: names are case-insensitive, and
    a request for ``LLAMA3.2`` is served by the ``llama3.2:latest`` that X-Corral-Model names."""
    if model.display == model.display.lower():
        return model.display  # the common case, spelled as listed already
    for m in state.models if state is not None else ():
        if key_of(m.name) == model.key:
            return parse_name(m.name).display
    return model.display


def parse_time(value: str) -> float:
    """RFC3339 with Go's nanoseconds → unix seconds (0 when unparseable)."""
    try:
        dt = datetime.fromisoformat(_FRACTION.sub(r"\1", value).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


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
            k = key_of(m.name)
            if k is None:
                continue
            t = parse_time(m.modified_at)
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
        if key_of(m.name) is not None
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
    except InvalidModelName:  # not reached for merged tags (every one has a key); kept total
        owner = "library"
    return _V1Model(model_id or m.name, "model", int(parse_time(m.modified_at)), owner)


def v1_models_body(agents: list[AgentState]) -> bytes:
    """OpenAI's list; ``data`` is null when there are no models, as Ollama's own /v1/models does."""
    data = [_v1(m) for m in merged_tags(agents)]
    return _enc.encode(_V1List("list", data or None))


def v1_model_body(agents: list[AgentState], model_id: str) -> bytes | None:
    key = key_of(model_id)
    if key is None:
        return None
    for m in merged_tags(agents):
        if key_of(m.name) == key:
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
