"""The model index: the pure function from agent states to ``model.*`` entries (its writer on a real
KV bucket is tested in tests/integration/test_model_index_kv.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec
from corral.protocol.messages import AgentState, ModelDetails, PsModel, TagModel
from corral.protocol.names import parse_name
from corral.registry.index import (
    Holder,
    ModelEntry,
    holdings,
    index_key,
    model_entry_decoder,
    model_index,
)

DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")  # what JetStream accepts as a key


def tag(name: str) -> TagModel:
    return TagModel(
        name=name,
        model=name,
        modified_at="2025-01-01T00:00:00Z",
        size=1,
        digest=DIGEST,
        details=ModelDetails(),
    )


def ps(name: str, expires_at: str = "2025-01-01T00:05:00Z", size_vram: int = 1) -> PsModel:
    return PsModel(name=name, model=name, size=1, digest=DIGEST, expires_at=expires_at, size_vram=size_vram)


def agent(
    agent_id: str, vendor: str, disk: Sequence[str], loaded: Sequence[str] = (), **extra: object
) -> AgentState:
    return AgentState(
        id=agent_id,
        vendor=vendor,
        host="h",
        ollama_url="http://h:11434",
        models=tuple(tag(n) for n in disk),
        loaded=tuple(ps(n) for n in loaded),
        **extra,  # type: ignore[arg-type]
    )


def key(name: str) -> str:
    return index_key(parse_name(name).token)


# -- the pure part ---------------------------------------------------------------------------------
def test_one_entry_per_model_with_holders_sorted_and_vendors_kept() -> None:
    fleet = [
        agent("nvidia-2", "nvidia", ["llama3.2:latest", "qwen3:8b"], ("llama3.2:latest",)),
        agent("amd-1", "amd", ["llama3.2:latest"], ("llama3.2:latest",)),
        agent("nvidia-0", "nvidia", ["llama3.2:latest", "all-minilm:latest"]),
    ]
    index = model_index(fleet)
    assert list(index) == sorted(index)
    assert set(index) == {key("llama3.2"), key("qwen3:8b"), key("all-minilm")}
    assert index[key("llama3.2")] == ModelEntry(
        model="llama3.2:latest",
        disk=(
            Holder(agent="amd-1", vendor="amd"),
            Holder(agent="nvidia-0", vendor="nvidia"),
            Holder(agent="nvidia-2", vendor="nvidia"),
        ),
        loaded=(Holder(agent="amd-1", vendor="amd"), Holder(agent="nvidia-2", vendor="nvidia")),
    )
    assert index[key("qwen3:8b")] == ModelEntry(
        model="qwen3:8b", disk=(Holder(agent="nvidia-2", vendor="nvidia"),)
    )


def test_keys_are_model_tokens_under_model_dot() -> None:
    fleet = [agent("a", "cpu", ["llama3.2:latest", "hf.co/User/Repo:Q4_K_M", "namespace/m:1.5b"])]
    index = model_index(fleet)
    assert key("llama3.2") == "model.llama3=2E2=3Alatest"
    assert set(index) == {key("llama3.2"), key("hf.co/User/Repo:Q4_K_M"), key("namespace/m:1.5b")}
    for k, entry in index.items():
        assert KV_KEY.fullmatch(k) and k.startswith("model.")
        assert k == key(entry.model)
    assert index[key("hf.co/User/Repo:Q4_K_M")].model == "hf.co/user/repo:q4_k_m"


def test_spellings_of_one_model_are_one_entry() -> None:
    fleet = [
        agent("a", "nvidia", ["Llama3.2"]),
        agent("b", "amd", ["registry.ollama.ai/library/llama3.2:latest"]),
    ]
    (entry,) = model_index(fleet).values()
    assert entry.model == "llama3.2:latest" and [h.agent for h in entry.disk] == ["a", "b"]


def test_loaded_without_disk_still_has_an_entry_and_bad_names_are_skipped() -> None:
    fleet = [agent("a", "amd", ["not a name!", "x/y/z/w"], ["gemma3:4b"])]
    assert model_index(fleet) == {
        key("gemma3:4b"): ModelEntry(model="gemma3:4b", loaded=(Holder(agent="a", vendor="amd"),))
    }


def test_empty_fleet_has_no_entries() -> None:
    assert model_index([]) == {}
    assert model_index([agent("a", "cpu", [])]) == {}


def test_a_heartbeat_changes_neither_holdings_nor_the_encoded_entries() -> None:
    before = agent("a", "nvidia", ["qwen3:8b", "llama3.2"], ["llama3.2"], updated_at=1.0, in_flight=0)
    after = msgspec.structs.replace(
        before,
        models=tuple(reversed(before.models)),  # Ollama may list them in another order
        loaded=(ps("llama3.2", expires_at="2025-01-01T00:09:00Z", size_vram=2),),
        updated_at=2.0,
        in_flight=3,
        queued=1,
    )
    assert holdings(before) == holdings(after)
    enc = msgspec.json.Encoder()
    assert {k: enc.encode(v) for k, v in model_index([before]).items()} == {
        k: enc.encode(v) for k, v in model_index([after]).items()
    }
    assert holdings(msgspec.structs.replace(after, loaded=())) != holdings(before)
    assert holdings(msgspec.structs.replace(after, vendor="amd")) != holdings(before)


def test_entries_round_trip_as_json_with_empty_lists_spelled_out() -> None:
    entry = ModelEntry(model="gemma3:4b", loaded=(Holder(agent="a", vendor="amd"),))
    raw = msgspec.json.encode(entry)
    assert msgspec.json.decode(raw) == {
        "model": "gemma3:4b",
        "disk": [],
        "loaded": [{"agent": "a", "vendor": "amd"}],
    }
    assert model_entry_decoder.decode(raw) == entry
