"""Merged fleet views as one Ollama server shows them: tags, ps, /v1/models, version."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from corral import views
from corral.protocol.messages import AgentState, ModelDetails, PsModel, TagModel
from corral.views import (
    fleet_version,
    merged_ps,
    merged_tags,
    parse_time,
    ps_body,
    status_view,
    tags_body,
    v1_model_body,
    v1_models_body,
)

DIGEST_A = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
DIGEST_B = "2ae6f6dd2b3f1c1d7e4b5a6978c0d1e2f3a4b5c6d7e8f90a1b2c3d4e5f6a7d8"
DIGEST_C = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
DETAILS = ModelDetails(family="llama", families=["llama"], parameter_size="3.2B", quantization_level="Q4_K_M")


def tag(name: str, modified_at: str, digest: str = DIGEST_A, size: int = 2019393189) -> TagModel:
    return TagModel(name=name, model=name, modified_at=modified_at, size=size, digest=digest, details=DETAILS)


def ps(name: str, expires_at: str, digest: str = DIGEST_A) -> PsModel:
    return PsModel(
        name=name,
        model=name,
        size=5137025024,
        digest=digest,
        details=DETAILS,
        expires_at=expires_at,
        size_vram=5137025024,
        context_length=4096,
    )


def agent(
    agent_id: str,
    *,
    models: tuple[TagModel, ...] = (),
    loaded: tuple[PsModel, ...] = (),
    version: str = "",
) -> AgentState:
    return AgentState(
        id=agent_id,
        vendor="nvidia",
        host=agent_id,
        ollama_url=f"http://{agent_id}:11434",
        ollama_version=version,
        models=models,
        loaded=loaded,
    )


def unix(*args: int, tz: timezone = UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


# -- parse_time --------------------------------------------------------------------------------

PDT = timezone(timedelta(hours=-7))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Go RFC3339Nano: nine fractional digits, numeric offset (as /api/tags shows it)
        ("2025-05-04T17:37:44.706015396-07:00", unix(2025, 5, 4, 17, 37, 44, 706015, tz=PDT)),
        ("2025-05-05T00:37:44.706015396Z", unix(2025, 5, 5, 0, 37, 44, 706015)),
        ("2025-10-26T17:15:24.097767Z", unix(2025, 10, 26, 17, 15, 24, 97767)),
        ("2025-10-26T17:15:24.097767123Z", unix(2025, 10, 26, 17, 15, 24, 97767)),
        # Go trims trailing zeros: five digits (as /api/ps shows it), one digit, none
        ("2024-06-04T14:38:31.83753-07:00", unix(2024, 6, 4, 14, 38, 31, 837530, tz=PDT)),
        ("2025-01-01T00:00:00.5Z", unix(2025, 1, 1, 0, 0, 0, 500000)),
        ("2025-01-01T00:00:00Z", 1735689600.0),
        ("2025-01-01T05:30:00+05:30", 1735689600.0),
        ("2025-01-01T05:30:00.000000001+05:30", 1735689600.0),
    ],
)
def test_parse_time(value: str, expected: float) -> None:
    assert parse_time(value) == pytest.approx(expected, abs=1e-6)


def test_parse_time_keep_alive_forever() -> None:
    # keep_alive < 0 ⇒ now + MaxInt64 ns, around the year 2318 (as /api/ps shows it)
    t = parse_time("2318-04-11T19:47:16.854775807-07:00")
    assert t == pytest.approx(unix(2318, 4, 12, 2, 47, 16, 854775), abs=1e-3)


def test_parse_time_naive_is_utc() -> None:
    assert parse_time("2025-01-01T00:00:00") == 1735689600.0


@pytest.mark.parametrize("value", ["", "garbage", "2025-13-01T00:00:00Z", "yesterday"])
def test_parse_time_unparseable_is_zero(value: str) -> None:
    assert parse_time(value) == 0.0


def test_offsets_compare_by_instant_not_by_text() -> None:
    later = "2025-05-04T17:37:44-07:00"  # 2025-05-05T00:37:44Z
    earlier = "2025-05-05T00:00:00Z"
    assert later < earlier  # as strings
    assert parse_time(later) > parse_time(earlier)


# -- merged_tags -------------------------------------------------------------------------------


def test_tags_merge_dedupes_by_normalised_name_newest_wins() -> None:
    a = agent("a", models=(tag("llama3.2:latest", "2025-05-04T10:00:00Z", DIGEST_A),))
    b = agent(
        "b",
        models=(
            tag("registry.ollama.ai/library/llama3.2:latest", "2025-05-05T10:00:00Z", DIGEST_B),
            tag("mistral:latest", "2025-01-01T00:00:00Z", DIGEST_C),
        ),
    )
    c = agent("c", models=(tag("Llama3.2", "2025-05-03T10:00:00Z", DIGEST_C),))
    merged = merged_tags([a, b, c])
    assert [m.digest for m in merged] == [DIGEST_B, DIGEST_C]
    assert merged[0].modified_at == "2025-05-05T10:00:00Z"
    assert merged[1].name == "mistral:latest"
    # The winning entry travels unchanged: name, digest (64 hex, no sha256: prefix), details.
    assert merged[0] is b.models[0]


def test_tags_newest_wins_regardless_of_agent_order() -> None:
    old = agent("a", models=(tag("llama3.2:latest", "2025-05-04T17:37:44.706015396-07:00", DIGEST_A),))
    new = agent("b", models=(tag("llama3.2:latest", "2025-05-05T01:00:00Z", DIGEST_B),))
    assert [m.digest for m in merged_tags([old, new])] == [DIGEST_B]
    assert [m.digest for m in merged_tags([new, old])] == [DIGEST_B]


def test_tags_sorted_newest_first_across_offsets() -> None:
    a = agent(
        "a",
        models=(
            tag("a:latest", "2025-05-05T00:00:00Z"),
            tag("b:latest", "2025-05-04T17:37:44.706015396-07:00"),  # 00:37:44Z, the newest
            tag("c:latest", "2024-01-01T00:00:00+09:00"),
        ),
    )
    d = agent("d", models=(tag("hf.co/bartowski/X-GGUF:Q4_K_M", "2025-05-04T12:00:00Z"),))
    names = [m.name for m in merged_tags([a, d])]
    assert names == ["b:latest", "a:latest", "hf.co/bartowski/X-GGUF:Q4_K_M", "c:latest"]


def test_different_tags_and_namespaces_are_different_models() -> None:
    a = agent(
        "a",
        models=(
            tag("llama3.2:latest", "2025-01-01T00:00:00Z"),
            tag("llama3.2:1b", "2025-01-02T00:00:00Z"),
            tag("mattw/llama3.2:latest", "2025-01-03T00:00:00Z"),
        ),
    )
    assert len(merged_tags([a])) == 3


def test_tags_empty() -> None:
    assert merged_tags([]) == []
    assert merged_tags([agent("a")]) == []
    assert tags_body([]) == b'{"models":[]}'


def test_tags_body_shape_matches_ollama() -> None:
    body = json.loads(
        tags_body([agent("a", models=(tag("llama3.2:latest", "2025-05-04T17:37:44.706015396-07:00"),))])
    )
    assert body == {
        "models": [
            {
                "name": "llama3.2:latest",
                "model": "llama3.2:latest",
                "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                "size": 2019393189,
                "digest": DIGEST_A,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "3.2B",
                    "quantization_level": "Q4_K_M",
                },
            }
        ]
    }


# -- merged_ps ---------------------------------------------------------------------------------


def test_ps_one_entry_per_agent_and_model_sorted_by_expiry_desc() -> None:
    a = agent("a", loaded=(ps("llama3.2:latest", "2025-05-05T00:10:00Z"),))
    b = agent(
        "b",
        loaded=(
            ps("llama3.2:latest", "2025-05-04T17:20:00-07:00"),  # 00:20Z
            ps("mistral:latest", "2318-04-11T19:47:16.854775807-07:00"),  # forever
        ),
    )
    rows = merged_ps([a, b])
    assert [(r.name, r.expires_at) for r in rows] == [
        ("mistral:latest", "2318-04-11T19:47:16.854775807-07:00"),
        ("llama3.2:latest", "2025-05-04T17:20:00-07:00"),
        ("llama3.2:latest", "2025-05-05T00:10:00Z"),
    ]


def test_ps_empty() -> None:
    assert merged_ps([agent("a"), agent("b")]) == []
    assert ps_body([]) == b'{"models":[]}'


def test_ps_body_shape_matches_ollama() -> None:
    body = json.loads(
        ps_body([agent("a", loaded=(ps("mistral:latest", "2024-06-04T14:38:31.83753-07:00"),))])
    )
    (row,) = body["models"]
    # Ollama's fields, plus where the row runs (clients ignore unknown fields)
    assert row.pop("corral") == {"agent": "a", "vendor": "nvidia", "host": "a"}
    assert set(row) == {
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    }
    assert row["expires_at"] == "2024-06-04T14:38:31.83753-07:00"


# -- /v1/models --------------------------------------------------------------------------------


def test_v1_models_data_is_null_when_empty() -> None:
    assert json.loads(v1_models_body([])) == {"object": "list", "data": None}
    assert json.loads(v1_models_body([agent("a")])) == {"object": "list", "data": None}


def test_v1_models_list() -> None:
    a = agent(
        "a",
        models=(
            tag("llama3.2:latest", "2025-05-04T17:37:44.706015396-07:00"),
            tag("mattw/pyg:7b", "2025-01-01T00:00:00Z"),
            tag("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", "2024-01-01T00:00:00.999999999Z"),
        ),
    )
    body = json.loads(v1_models_body([a]))
    assert body == {
        "object": "list",
        "data": [
            {"id": "llama3.2:latest", "object": "model", "created": 1746405464, "owned_by": "library"},
            {"id": "mattw/pyg:7b", "object": "model", "created": 1735689600, "owned_by": "mattw"},
            {
                "id": "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
                "object": "model",
                "created": 1704067200,  # Unix seconds truncate the fraction
                "owned_by": "bartowski",
            },
        ],
    }


@pytest.mark.parametrize("model_id", ["llama3.2", "llama3.2:latest", "Llama3.2:Latest", "library/llama3.2"])
def test_v1_model_echoes_the_path_param(model_id: str) -> None:
    a = agent("a", models=(tag("llama3.2:latest", "2025-05-04T17:37:44.706015396-07:00"),))
    assert json.loads(v1_model_body([a], model_id) or b"null") == {
        "id": model_id,
        "object": "model",
        "created": 1746405464,
        "owned_by": "library",
    }


def test_v1_model_not_found() -> None:
    a = agent("a", models=(tag("llama3.2:latest", "2025-05-04T17:37:44Z"),))
    assert v1_model_body([a], "mistral") is None
    assert v1_model_body([a], "llama3.2:1b") is None
    assert v1_model_body([], "llama3.2") is None


# -- fleet_version -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        (["0.13.0", "0.12.3"], "0.12.3"),
        (["v0.12.3", "0.13.0"], "v0.12.3"),
        (["0.12.10", "0.12.9"], "0.12.9"),  # numeric, not lexicographic
        (["0.13.0-rc1", "0.12.3"], "0.12.3"),
        (["0.13.1", "0.13.0-rc1"], "0.13.0-rc1"),
        (["0.5.7"], "0.5.7"),
    ],
)
def test_fleet_version_oldest_wins(versions: list[str], expected: str) -> None:
    agents = [agent(f"a{i}", version=v) for i, v in enumerate(versions)]
    assert fleet_version(agents, "0.0.0-default") == expected
    assert fleet_version(list(reversed(agents)), "0.0.0-default") == expected


def test_fleet_version_pre_release_is_older_than_its_release() -> None:
    agents = [agent("a", version="0.13.0"), agent("b", version="0.13.0-rc1")]
    assert fleet_version(agents, "x") == "0.13.0-rc1"
    assert fleet_version(list(reversed(agents)), "x") == "0.13.0-rc1"


def test_fleet_version_default_when_none_known() -> None:
    assert fleet_version([], "0.12.3") == "0.12.3"
    assert fleet_version([agent("a"), agent("b")], "0.12.3") == "0.12.3"
    assert fleet_version([agent("a"), agent("b", version="0.11.0")], "0.12.3") == "0.11.0"


def test_a_name_without_a_key_is_shown_nowhere() -> None:
    """A name Ollama reports that is not a valid model name has no key: it is routed nowhere
    (`corral.protocol.names.key_of`), so no view may list it either."""
    bad = "not a model name!"
    a = agent(
        "a",
        models=(tag("llama3.2:latest", "2025-01-02T00:00:00Z"), tag(bad, "2025-01-03T00:00:00Z", DIGEST_B)),
        loaded=(ps("llama3.2:latest", "2025-01-02T00:05:00Z"), ps(bad, "2025-01-02T00:06:00Z", DIGEST_B)),
    )
    assert [m.name for m in merged_tags([a])] == ["llama3.2:latest"]
    assert [m["name"] for m in json.loads(tags_body([a]))["models"]] == ["llama3.2:latest"]
    assert [r.name for r in merged_ps([a])] == ["llama3.2:latest"]
    assert [m["id"] for m in json.loads(v1_models_body([a]))["data"]] == ["llama3.2:latest"]
    assert v1_model_body([a], bad) is None
    row = status_view([a]).agents[0]
    assert row.models_on_disk == 1 and [m.model for m in row.loaded] == ["llama3.2:latest"]


def test_rates_not_rewritten_for_five_of_their_periods_are_not_current() -> None:
    rates = views.Rates(
        window_s=60, requests=1, errors=0, tokens=1, requests_per_s=0.0, tokens_per_s=0.0, every_s=1.0
    )
    assert views.current(rates, 4.9) is rates
    assert views.current(rates, 5.1) is None  # its aggregator stopped
    unsaid = msgspec.structs.replace(rates, every_s=0.0)  # an aggregator that does not say
    assert views.current(unsaid, 3600.0) is unsaid
    assert views.current(None, 0.0) is None


def test_an_agents_slots_are_its_parallel_per_model_loaded_or_busy() -> None:
    """Ollama runs ``parallel`` requests per loaded model: one with two models busy (the second
    waiting inside Ollama for a swap, say) has twice the slots, and its rows say which is in use."""
    a = msgspec.structs.replace(
        agent(
            "a",
            loaded=(ps("llama3.2:latest", "2099-01-01T00:00:00Z"), ps("qwen3:8b", "2099-01-01T00:00:00Z")),
        ),
        parallel=4,
        in_flight=5,
        busy_models=("llama3.2:latest", "gemma3:4b"),
    )
    row = json.loads(views.status_body([a]))["agents"][0]
    assert (row["in_flight"], row["slots"], row["parallel"]) == (5, 12, 4)  # three models' runners
    assert {m["model"]: m["busy"] for m in row["loaded"]} == {"llama3.2:latest": True, "qwen3:8b": False}
    idle = json.loads(views.status_body([agent("b")]))["agents"][0]
    assert idle["slots"] == idle["parallel"]  # nothing loaded: one runner's worth
