"""Typed messages: KV values and events. One frozen, keyword-only base; unknown fields ignored.

Schema evolution: new fields get defaults, no field ever changes type. Golden samples in
``tests/unit/golden/`` keep old messages decodable.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every Corral wire struct."""


class ModelDetails(msgspec.Struct, frozen=True, kw_only=True):
    """Ollama's ``details`` object, all six keys always present, as in /api/tags; the keys newer
    Ollamas add are kept when given and left out when not (`msgspec.UNSET`)."""

    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""
    context_length: int | None | msgspec.UnsetType = msgspec.UNSET
    embedding_length: int | None | msgspec.UnsetType = msgspec.UNSET


class TagModel(msgspec.Struct, frozen=True, kw_only=True):
    """One ``/api/tags`` entry as Ollama reports it; ``capabilities`` (``completion``,
    ``embedding``, ``tools``, ...) and the cloud stubs' ``remote_*`` only where it gives them."""

    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails = msgspec.field(default_factory=ModelDetails)
    capabilities: list[str] | None | msgspec.UnsetType = msgspec.UNSET
    remote_model: str | None | msgspec.UnsetType = msgspec.UNSET
    remote_host: str | None | msgspec.UnsetType = msgspec.UNSET


class PsModel(msgspec.Struct, frozen=True, kw_only=True):
    """One ``/api/ps`` entry as Ollama reports it."""

    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails = msgspec.field(default_factory=ModelDetails)
    expires_at: str
    size_vram: int
    context_length: int = 0


class ModelMeta(Message, frozen=True, kw_only=True, omit_defaults=True):
    """What Ollama's memory estimate needs of one model, read once from its /api/show
    ``model_info`` (``<arch>.block_count``, ``<arch>.attention.head_count_kv``, the head dimension
    from ``<arch>.attention.key_length`` or ``<arch>.embedding_length`` / ``head_count``,
    ``<arch>.context_length``). 0 = not given."""

    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    trained_ctx: int = 0


class Gpu(Message, frozen=True, kw_only=True, omit_defaults=True):
    index: int
    name: str
    vendor: str
    vram_total: int
    vram_free: int
    utilization: float | None = None
    source: str = "config"  # nvml | amd-sysfs | system-memory | config


AgentStatus = Literal["active", "draining", "cordoned"]


class AgentState(Message, frozen=True, kw_only=True, omit_defaults=True):
    """Value of ``{root}_agents`` / key = agent id. Published on change and on every heartbeat.

    Many attributes, on purpose: each is one field of one immutable message, read together by
    every view and router; splitting it would only nest the wire format."""

    id: str
    vendor: str
    host: str
    ollama_url: str
    ollama_version: str = ""
    ollama_down: bool = False  # its last reading of its Ollama failed: it offers nothing meanwhile
    status: AgentStatus = "active"
    gpus: tuple[Gpu, ...] = ()
    models: tuple[TagModel, ...] = ()
    loaded: tuple[PsModel, ...] = ()
    loading: tuple[str, ...] = ()  # model keys a load (or a reload at another context) is under way for
    loading_ctx: dict[str, int] = msgspec.field(default_factory=dict)  # model key → the num_ctx that
    # load is for (0 = the agent's default); a load for another context is no use to a request
    parallel: int = 1  # slots per loaded model (OLLAMA_NUM_PARALLEL)
    default_num_ctx: int = 0  # num_ctx of a request without one; a runner with another must reload
    default_ctx: dict[str, int] = msgspec.field(default_factory=dict)  # model key → the context its
    # runner got from a request without num_ctx, as observed (wins over default_num_ctx's guess)
    trained_ctx: dict[str, int] = msgspec.field(default_factory=dict)  # loaded model key → trained
    # context (Ollama caps a runner's num_ctx at it, so a small model's default runner is smaller)
    model_meta: dict[str, ModelMeta] = msgspec.field(default_factory=dict)  # model key (on disk) →
    # its shape, for the router's estimate of what a load of it takes in memory
    busy_models: tuple[str, ...] = ()  # model keys with requests here now or lately (not to be evicted)
    load_s: dict[str, float] = msgspec.field(default_factory=dict)  # model key → seconds its last
    # load here took, as observed (`corral.routing.loads`; the cost model estimates the others)
    max_loaded: int = 0  # its Ollama's OLLAMA_MAX_LOADED_MODELS, as configured (0: Ollama's default)
    request_s: dict[str, float] = msgspec.field(default_factory=dict)  # model key → seconds a request
    # of it holds a slot here once the model is loaded (the median of the last few answered here)
    slot_s: dict[str, float] = msgspec.field(default_factory=dict)  # model key → slot-seconds its
    # requests have held here since the agent started, those running counted so far (what each
    # model's demand is measured by: the difference between two readings is what it ran between)
    in_flight: int = 0
    queued: int = 0
    max_queue: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    heartbeat_s: float = 5.0


class AgentEvent(Message, frozen=True, kw_only=True, omit_defaults=True):
    """``{root}.events.agent`` — joined, left (clean stop) or dead (missed heartbeats)."""

    kind: Literal["joined", "left", "dead"]
    agent: str
    at: float


class RequestFinished(Message, frozen=True, kw_only=True, omit_defaults=True):
    """``{root}.events.request`` — one per finished request, for stats."""

    agent: str
    model: str
    endpoint: str
    status: int
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    eval_count: int = 0
    prompt_eval_count: int = 0


agent_state_encoder = msgspec.json.Encoder()
agent_state_decoder = msgspec.json.Decoder(AgentState)


def agent_state_of(key: str, value: bytes) -> AgentState:
    """The agent state stored under KV key ``key`` (the agent's id). A value that does not decode,
    or that names another agent, raises `msgspec.DecodeError` (`msgspec.ValidationError`): an agent
    writes only its own key, so the key, not the value, says whose state it is."""
    state = agent_state_decoder.decode(value)
    if state.id != key:
        raise msgspec.ValidationError(f"the state under {key!r} names agent {state.id[:80]!r}")
    return state


agent_event_decoder = msgspec.json.Decoder(AgentEvent)
request_finished_decoder = msgspec.json.Decoder(RequestFinished)


class PlaceRequest(Message, frozen=True, kw_only=True, omit_defaults=True):
    """``{root}.registry.place`` — where should a cold model load? Asked by gateways."""

    model: str  # model key
    token: str
    vendor: str | None = None
    strict: bool = False
    num_ctx: int | None = None
    proposal: str = ""  # the asking gateway's own choice, used if the registry knows no better
    exclude: tuple[str, ...] = ()  # agents that just failed this request (not to be chosen again)


class PlaceReply(Message, frozen=True, kw_only=True, omit_defaults=True):
    """The agent the model loads on; ``mine`` when the asker's request is the one that loads it
    (everyone else waits for that load instead of starting another)."""

    agent: str = ""
    mine: bool = False


class LoadMarker(Message, frozen=True, kw_only=True, omit_defaults=True):
    """``{root}_models`` key ``loading.{token}.{num_ctx or 0}.{pin or any}``: one load of a model at a time."""

    agent: str
    at: float


place_request_decoder = msgspec.json.Decoder(PlaceRequest)
place_reply_decoder = msgspec.json.Decoder(PlaceReply)
load_marker_decoder = msgspec.json.Decoder(LoadMarker)
