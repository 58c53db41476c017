"""Slot time: what an agent publishes of the time its requests held slots (`SlotTime`, running ones
counted so far), and what a reader makes of two readings of the fleet (`SlotTimeReadings`)."""

from __future__ import annotations

import msgspec
import pytest
from corral.agent.usage import SlotTime
from corral.protocol.messages import AgentState
from corral.protocol.names import encode_token, parse_name
from corral.routing import DemandMeter, SlotTimeReadings

A, B = parse_name("qwen3:8b").key, parse_name("llama3.2").key
TA, TB = encode_token(A), encode_token(B)


def test_running_requests_count_so_far_and_finished_ones_are_kept() -> None:
    clock = SlotTime()
    assert clock.totals([]) == {}
    assert clock.totals([(TA, 2.0), (TA, 3.5), (TB, 1.0)]) == {A: 5.5, B: 1.0}
    clock.ended(TA, 4.0)  # one of them ended after 4 s: it is no longer listed as running
    assert clock.totals([(TA, 3.6), (TB, 1.1)]) == {A: 7.6, B: 1.1}
    clock.ended(None, 9.0)  # a pull, a show: no slot held
    clock.ended(TB, 0.0)  # never reached Ollama
    assert clock.totals([(None, 5.0)]) == {A: 4.0}


def test_totals_never_go_back_as_a_request_ends() -> None:
    clock, readings = SlotTime(), []
    running = {f"r{i}": 0.0 for i in range(4)}
    for step in range(1, 41):  # 4 s in 0.1 s steps; a request ends every 0.9 s, another starts
        for rid in running:
            running[rid] += 0.1
        if step % 9 == 0:
            rid = next(iter(running))
            clock.ended(TA, running.pop(rid))
            running[f"n{step}"] = 0.0
        readings.append(clock.totals((TA, s) for s in running.values())[A])
    assert readings == sorted(readings)
    assert readings[-1] == pytest.approx(4 * 4.0, abs=1e-6)  # four slots busy all along


def agent(id: str, slot_s: dict[str, float], started_at: float = 100.0) -> AgentState:
    return AgentState(id=id, vendor="nvidia", host=id, ollama_url=f"http://{id}", started_at=started_at,
                      slot_s=slot_s)  # fmt: skip


def test_a_reading_is_what_each_model_held_since_the_last() -> None:
    r = SlotTimeReadings()
    assert r.read([agent("a", {A: 500.0}), agent("b", {B: 70.0})]) == {}  # baselines: their past
    held = r.read([agent("a", {A: 512.0, B: 1.5}), agent("b", {B: 74.0})])
    assert held == pytest.approx({A: 12.0, B: 5.5})
    assert r.read([agent("a", {A: 512.0, B: 1.5}), agent("b", {B: 74.0})]) == {}  # nothing ran


def test_an_agent_that_started_again_counts_from_zero_and_one_that_left_from_a_new_baseline() -> None:
    r = SlotTimeReadings()
    r.read([agent("a", {A: 500.0}), agent("b", {B: 70.0})])
    # a restarted (new started_at, its totals from zero), b gone from the fleet for a reading
    assert r.read([agent("a", {A: 3.0}, started_at=200.0)]) == {A: 3.0}
    assert r.read([agent("a", {A: 4.0}, started_at=200.0), agent("b", {B: 90.0})]) == {A: 1.0}
    assert r.read([agent("a", {A: 4.0}, started_at=200.0), agent("b", {B: 91.0})]) == {B: 1.0}


def test_a_long_stream_shows_in_the_demand_while_it_runs() -> None:
    """Two streams of ten minutes on one agent: read every second from the state it publishes, the
    running average nears two slots long before either ends (a count at their end would show none)."""
    meter, r, clock = DemandMeter(30.0, now=0.0), SlotTimeReadings(), SlotTime()
    for t in range(121):  # two minutes of the two streams
        state = agent("a", clock.totals([(TA, float(t)), (TA, float(t))]))
        for key, seconds in r.read([state]).items():
            meter.ran(key, seconds)
        meter.sample(float(t), {})
    assert meter.demand()[A].running == pytest.approx(2.0, rel=0.03)


def test_an_agent_state_without_slot_time_decodes_as_none() -> None:
    """An agent of a version before ``slot_s``: its state reads as reporting no slot time."""
    raw = b'{"id":"a","vendor":"nvidia","host":"h","ollama_url":"http://h"}'
    assert msgspec.json.decode(raw, type=AgentState).slot_s == {}
