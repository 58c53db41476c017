"""Wire messages: golden samples stay decodable, unknown fields are ignored, defaults fill gaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from corral.protocol.messages import (
    AgentEvent,
    AgentState,
    Gpu,
    Message,
    ModelDetails,
    PsModel,
    RequestFinished,
    TagModel,
    agent_event_decoder,
    agent_state_decoder,
    agent_state_encoder,
    request_finished_decoder,
)

GOLDEN = Path(__file__).parent / "golden"

DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "agent_state_v1.json": agent_state_decoder,
    "agent_event_v1.json": agent_event_decoder,
    "request_finished_v1.json": request_finished_decoder,
}

DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"

# /api/tags as Ollama answers it, verbatim.
TAGS_SAMPLE = b"""{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest",
  "modified_at":"2025-05-04T17:37:44.706015396-07:00","size":2019393189,
  "digest":"a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
  "details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],
             "parameter_size":"3.2B","quantization_level":"Q4_K_M"}}]}"""

# /api/ps as Ollama answers it, with ``{...as in tags...}`` spelled out (families null, as Ollama may send it).
PS_SAMPLE = """{"models":[{"name":"mistral:latest","model":"mistral:latest","size":5137025024,
  "digest":"2ae6f6dd\u2026d8","details":{"parent_model":"","format":"gguf","family":"llama",
  "families":null,"parameter_size":"7.2B","quantization_level":"Q4_0"},
  "expires_at":"2024-06-04T14:38:31.83753-07:00","size_vram":5137025024,"context_length":4096}]}""".encode()


class Tags(msgspec.Struct):
    models: list[TagModel]


class Ps(msgspec.Struct):
    models: list[PsModel]


def minimal_state(**extra: Any) -> AgentState:
    return AgentState(id="a1", vendor="cpu", host="h1", ollama_url="http://h1:11434", **extra)


# -- golden samples ----------------------------------------------------------------------------


def test_every_golden_file_has_a_decoder() -> None:
    assert {p.name for p in GOLDEN.glob("*.json")} == set(DECODERS)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_golden_sample_decodes_and_re_encodes_identically(name: str) -> None:
    raw = (GOLDEN / name).read_bytes()
    decoded = DECODERS[name].decode(raw)
    encoded = agent_state_encoder.encode(decoded)
    assert json.loads(encoded) == json.loads(raw)
    assert DECODERS[name].decode(encoded) == decoded


def test_golden_agent_state_content() -> None:
    state = agent_state_decoder.decode((GOLDEN / "agent_state_v1.json").read_bytes())
    assert state.status == "draining"
    assert [g.source for g in state.gpus] == ["nvml", "config"]  # the second relies on the default
    assert state.gpus[1].utilization is None
    assert state.models[0].details.families == ["llama"]
    assert state.models[1].details.families is None
    assert state.loaded[0].context_length == 4096
    assert state.loading == ("hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m",)
    assert isinstance(state.gpus, tuple)


# -- evolution: unknown fields, missing fields -------------------------------------------------


def test_unknown_fields_are_ignored_at_every_level() -> None:
    doc = json.loads((GOLDEN / "agent_state_v1.json").read_bytes())
    doc["added_in_v9"] = {"anything": [1, 2, 3]}
    doc["gpus"][0]["pcie_gen"] = 5
    doc["models"][0]["added_in_ollama_9"] = ["x"]
    doc["models"][0]["details"]["added_in_ollama_9"] = 131072
    doc["loaded"][0]["remote_host"] = None
    with_extras = agent_state_decoder.decode(json.dumps(doc).encode())
    assert with_extras == agent_state_decoder.decode((GOLDEN / "agent_state_v1.json").read_bytes())


def test_a_newer_ollamas_model_fields_are_kept_and_absent_ones_left_out() -> None:
    doc = json.loads((GOLDEN / "agent_state_v1.json").read_bytes())
    doc["models"][0]["capabilities"] = ["completion", "tools"]
    doc["models"][0]["details"]["context_length"] = 131072
    state = agent_state_decoder.decode(json.dumps(doc).encode())
    first, second = state.models[0], state.models[1]
    assert first.capabilities == ["completion", "tools"] and first.details.context_length == 131072
    again = json.loads(msgspec.json.encode(state))
    assert again["models"][0]["capabilities"] == ["completion", "tools"]
    assert again["models"][0]["details"]["context_length"] == 131072
    # a model its Ollama said nothing more of: Ollama's six detail keys, no others
    assert "capabilities" not in again["models"][1] and "remote_model" not in again["models"][1]
    assert set(again["models"][1]["details"]) == set(doc["models"][1]["details"])
    assert second.capabilities is msgspec.UNSET


def test_unknown_fields_ignored_in_events() -> None:
    ev = agent_event_decoder.decode(b'{"kind":"left","agent":"a1","at":1.5,"reason":"sigterm"}')
    assert ev == AgentEvent(kind="left", agent="a1", at=1.5)
    fin = request_finished_decoder.decode(
        b'{"agent":"a1","model":"m:latest","endpoint":"/api/generate","status":200,"queue_ms":3}'
    )
    assert fin.duration_ms == 0.0


def test_missing_optional_fields_get_defaults() -> None:
    state = agent_state_decoder.decode(
        b'{"id":"a1","vendor":"cpu","host":"h1","ollama_url":"http://h1:11434"}'
    )
    assert state == minimal_state()
    assert state.ollama_version == ""
    assert state.status == "active"
    assert state.gpus == state.models == state.loaded == state.loading == ()
    assert (state.parallel, state.in_flight, state.queued, state.max_queue) == (1, 0, 0, 0)
    assert state.heartbeat_s == 5.0
    fin = request_finished_decoder.decode(b'{"agent":"a1","model":"m","endpoint":"/api/chat","status":499}')
    assert fin.ttft_ms is None
    assert (fin.eval_count, fin.prompt_eval_count) == (0, 0)


def test_ollama_entries_without_details_or_context_length_decode() -> None:
    tag = msgspec.json.decode(
        b'{"name":"x:latest","model":"x:latest","modified_at":"2025-01-01T00:00:00Z","size":1,"digest":"d"}',
        type=TagModel,
    )
    assert tag.details == ModelDetails()
    assert tag.details.format == "gguf"
    ps = msgspec.json.decode(  # Ollama before v0.10.0 had no context_length
        b'{"name":"x:latest","model":"x:latest","size":1,"digest":"d",'
        b'"expires_at":"2025-01-01T00:00:00Z","size_vram":0}',
        type=PsModel,
    )
    assert ps.context_length == 0


@pytest.mark.parametrize(
    "raw",
    [
        b'{"vendor":"cpu","host":"h1","ollama_url":"u"}',  # no id
        b'{"id":"a1","vendor":"cpu","host":"h1","ollama_url":"u","status":"gone"}',  # not a status
        b'{"id":"a1","vendor":"cpu","host":"h1","ollama_url":"u","parallel":"4"}',  # types never change
    ],
)
def test_invalid_agent_state_is_rejected(raw: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        agent_state_decoder.decode(raw)


def test_unknown_event_kind_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        agent_event_decoder.decode(b'{"kind":"rebooted","agent":"a1","at":1.0}')


# -- encoding ----------------------------------------------------------------------------------


def test_omit_defaults_keeps_the_encoding_small() -> None:
    encoded = agent_state_encoder.encode(minimal_state())
    assert json.loads(encoded) == {"id": "a1", "vendor": "cpu", "host": "h1", "ollama_url": "http://h1:11434"}
    gpu = Gpu(index=0, name="cpu", vendor="cpu", vram_total=1, vram_free=1)
    assert set(json.loads(agent_state_encoder.encode(gpu))) == {
        "index",
        "name",
        "vendor",
        "vram_total",
        "vram_free",
    }
    assert agent_state_encoder.encode(AgentEvent(kind="joined", agent="a1", at=0.0)) == (
        b'{"kind":"joined","agent":"a1","at":0.0}'
    )


def test_ollama_details_always_carry_all_six_keys() -> None:
    tag = TagModel(
        name="x:latest", model="x:latest", modified_at="2025-01-01T00:00:00Z", size=1, digest=DIGEST
    )
    state = minimal_state(models=(tag,))
    details = json.loads(agent_state_encoder.encode(state))["models"][0]["details"]
    assert details == {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


# -- immutability ------------------------------------------------------------------------------


def _message_types() -> list[type[Message]]:
    return [AgentState, Gpu, AgentEvent, RequestFinished]


@pytest.mark.parametrize("cls", _message_types())
def test_message_types_are_frozen_keyword_only_and_omit_defaults(cls: type[Message]) -> None:
    assert issubclass(cls, Message)
    config = cls.__struct_config__
    assert config.frozen
    assert config.omit_defaults
    assert not config.forbid_unknown_fields


def test_frozen_structs_reject_mutation() -> None:
    state = minimal_state(gpus=(Gpu(index=0, name="g", vendor="nvidia", vram_total=2, vram_free=1),))
    with pytest.raises(AttributeError):
        state.status = "draining"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        state.gpus[0].vram_free = 0  # type: ignore[misc]
    event = AgentEvent(kind="joined", agent="a1", at=1.0)
    with pytest.raises(AttributeError):
        event.agent = "a2"  # type: ignore[misc]
    # Changing a frozen message means building a new one.
    assert msgspec.structs.replace(state, status="draining").status == "draining"
    assert state.status == "active"


@pytest.mark.parametrize("cls", _message_types())
def test_message_types_are_keyword_only(cls: type[Message]) -> None:
    with pytest.raises(TypeError, match="positional"):
        cls("x", "y", "z", "w", "v")


# -- Ollama's own shapes (/api/tags, /api/ps) --------------------------------------------------


def test_tags_sample_decodes_and_re_encodes() -> None:
    tags = msgspec.json.decode(TAGS_SAMPLE, type=Tags)
    (m,) = tags.models
    assert m.name == m.model == "llama3.2:latest"
    assert m.modified_at == "2025-05-04T17:37:44.706015396-07:00"
    assert m.size == 2019393189
    assert m.digest == DIGEST
    assert m.details == ModelDetails(
        parent_model="",
        format="gguf",
        family="llama",
        families=["llama"],
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
    )
    assert json.loads(msgspec.json.encode(tags)) == json.loads(TAGS_SAMPLE)


def test_ps_sample_decodes_with_null_families_and_re_encodes() -> None:
    ps = msgspec.json.decode(PS_SAMPLE, type=Ps)
    (m,) = ps.models
    assert m.name == "mistral:latest"
    assert m.size == m.size_vram == 5137025024
    assert m.details.families is None
    assert m.expires_at == "2024-06-04T14:38:31.83753-07:00"
    assert m.context_length == 4096
    assert json.loads(msgspec.json.encode(ps)) == json.loads(PS_SAMPLE)


def test_empty_tags_list() -> None:
    assert msgspec.json.decode(b'{"models":[]}', type=Tags).models == []
