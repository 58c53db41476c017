"""Models kept warm, the pure parts: which agents a pin loads on given the fleet, when a runner
counts as kept, that a cold load evicting a pinned model ranks last, and the pin/unpin rules."""

from __future__ import annotations

import datetime

import msgspec
import pytest
from corral.policyctl import PolicyError, remove_pin, set_pin
from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel
from corral.registry import pins
from corral.routing import Route, Router
from corral.runtime.policy import Policy, policy_decoder, policy_encoder
from corral.views.status import Pin, pin_rows, status_view

GB = 1_000_000_000
PINNED = "llama3.2:1b"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
FOREVER = "2318-04-11T23:47:16.854775807Z"  # Ollama's expires_at for keep_alive -1
SOON = "2026-01-01T00:05:00Z"


def agent(
    id: str,
    *,
    vendor: str = "nvidia",
    status: str = "active",
    loaded: dict[str, str] | None = None,  # model → expires_at
    disk: tuple[str, ...] = (PINNED,),
    free: int = 24 * GB,
    size: int = 2 * GB,
) -> AgentState:
    loaded = loaded or {}
    return msgspec.convert(
        {
            "id": id,
            "vendor": vendor,
            "host": id,
            "ollama_url": f"http://{id}:11434",
            "status": status,
            "gpus": [
                msgspec.to_builtins(
                    Gpu(index=0, name="gpu", vendor=vendor, vram_total=24 * GB, vram_free=free)
                )
            ],
            "models": [
                msgspec.to_builtins(TagModel(name=m, model=m, modified_at="", size=size, digest="d"))
                for m in disk
            ],
            "loaded": [
                msgspec.to_builtins(
                    PsModel(
                        name=m,
                        model=m,
                        size=size,
                        digest="d",
                        expires_at=exp,
                        size_vram=size,
                        context_length=4096,
                    )
                )
                for m, exp in loaded.items()
            ],
        },
        AgentState,
    )


def test_missing_replicas_load_on_agents_with_the_model_on_disk() -> None:
    fleet = [agent("a", loaded={PINNED: FOREVER}), agent("b"), agent("c", disk=())]
    todo = pins.plan(PINNED, Pin(replicas=2), fleet, now=NOW)
    assert todo == pins.PinPlan(load=("b",))


def test_enough_replicas_kept_forever_need_nothing() -> None:
    fleet = [agent("a", loaded={PINNED: FOREVER}), agent("b", loaded={PINNED: FOREVER}), agent("c")]
    assert pins.plan(PINNED, Pin(replicas=2), fleet, now=NOW) == pins.PinPlan()


def test_a_replica_that_would_expire_is_loaded_again_to_stay() -> None:
    fleet = [agent("a", loaded={PINNED: SOON}), agent("b")]
    assert pins.plan(PINNED, Pin(replicas=1), fleet, now=NOW) == pins.PinPlan(refresh=("a",))


def test_a_replica_whose_refresh_failed_lately_is_not_asked_again() -> None:
    """A refresh that failed (the agent does not answer: NATS restarting, an agent killed but not
    yet removed) waits out its retry time like a load; asked again at once, the keeper retried it
    thousands of times a second."""
    fleet = [agent("a", loaded={PINNED: SOON}), agent("b", loaded={PINNED: SOON})]
    todo = pins.plan(PINNED, Pin(replicas=2), fleet, avoid=frozenset({"a"}), now=NOW)
    assert todo == pins.PinPlan(refresh=("b",))


def test_draining_and_cordoned_agents_do_not_count_and_loads_under_way_do() -> None:
    fleet = [
        agent("a", status="draining", loaded={PINNED: FOREVER}),
        agent("b", status="cordoned", loaded={PINNED: FOREVER}),
        agent("c"),
        agent("d"),
    ]
    assert pins.plan(PINNED, Pin(replicas=2), fleet, now=NOW).load == ("c", "d")
    assert pins.plan(PINNED, Pin(replicas=2), fleet, starting=frozenset({"c"}), now=NOW).load == ("d",)
    assert pins.plan(PINNED, Pin(replicas=2), fleet, avoid=frozenset({"c"}), now=NOW).load == ("d",)


def test_the_vendor_of_a_pin_is_respected() -> None:
    fleet = [
        agent("a", vendor="amd"),
        agent("b", vendor="nvidia"),
        agent("c", vendor="amd", loaded={PINNED: FOREVER}),
    ]
    todo = pins.plan(PINNED, Pin(replicas=2, vendor="amd"), fleet, now=NOW)
    assert todo.load == ("a",)
    assert pins.plan(PINNED, Pin(replicas=3, vendor="nvidia"), fleet, now=NOW).load == ("b",)


def test_a_cold_load_evicting_a_pinned_model_ranks_last_when_another_agent_can_take_it() -> None:
    other = "qwen2.5:7b"
    # "a" loads faster but must first evict its idle runner of ``other``; "b" has room
    evicts = agent("a", loaded={other: FOREVER}, disk=(PINNED, other), free=1 * GB, size=2 * GB)
    roomy = agent("b", free=24 * GB, size=8 * GB)
    route = Route(key=PINNED)
    assert [a.id for a in Router().rank("auto", route, [evicts, roomy], {})] == ["a", "b"]
    assert [a.id for a in Router().rank("auto", route, [evicts, roomy], {}, frozenset({other}))] == ["b", "a"]
    plan = pins.plan(PINNED, Pin(replicas=1), [evicts, roomy], pinned=frozenset({other, PINNED}), now=NOW)
    assert plan.load == ("b",)
    assert pins.plan(PINNED, Pin(replicas=1), [evicts, roomy], now=NOW).load == ("a",)


def test_forever_reads_ollamas_far_future_expiry() -> None:
    assert pins.forever(FOREVER, NOW)
    assert not pins.forever(SOON, NOW)
    assert not pins.forever("", NOW)


def test_old_policy_records_decode_without_pins_and_pins_round_trip() -> None:
    assert policy_decoder.decode(b'{"aliases":{"a:latest":"b:latest"}}').pins == {}
    record = policy_encoder.encode(Policy(pins={PINNED: Pin(replicas=2, vendor="amd")}))
    assert policy_decoder.decode(record).pins == {PINNED: Pin(replicas=2, vendor="amd")}


def test_pin_and_unpin_rules() -> None:
    p = set_pin("llama3.2:1b", 2, None)(Policy())
    assert p.pins == {PINNED: Pin(replicas=2)}
    assert remove_pin("llama3.2:1b")(p).pins == {}
    with pytest.raises(PolicyError):
        set_pin("llama3.2:1b", 0, None)
    with pytest.raises(PolicyError):
        set_pin("llama3.2:1b", 1, "tpu")
    with pytest.raises(PolicyError):
        remove_pin("llama3.2:1b")(Policy())


def test_status_shows_wanted_and_actual_replicas() -> None:
    fleet = [agent("a", loaded={PINNED: FOREVER}), agent("b", status="draining", loaded={PINNED: FOREVER})]
    rows = pin_rows({PINNED: Pin(replicas=2)}, fleet)
    assert [(r.model, r.replicas, r.loaded, r.agents) for r in rows] == [(PINNED, 2, 1, ["a"])]
    assert status_view(fleet, pins={PINNED: Pin(replicas=2)}, now=0.0).pins == rows
    assert status_view(fleet, now=0.0).pins == []
