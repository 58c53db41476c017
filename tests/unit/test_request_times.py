"""How long a request holds a slot, as observed: the agent's median per model (load left out), the
fleet's where an agent has none, and the cost model's queue waits made of it."""

from __future__ import annotations

import msgspec
import pytest
from corral.agent.runners import REQUEST_SAMPLES, RunnerTracker
from corral.protocol.messages import AgentState, Gpu, PsModel, TagModel, agent_state_decoder
from corral.protocol.names import parse_name
from corral.routing import TYPICAL_REQUEST_S, Route, Router, estimate_wait, observed_times, request_time

GB = 1_000_000_000
NAME = "llama3.2:latest"
KEY = parse_name(NAME).key
TOKEN = parse_name(NAME).token
ROUTE = Route(key=KEY)


def test_the_tracker_keeps_the_median_time_a_request_held_its_slot_without_its_load() -> None:
    t = RunnerTracker(4096)
    t.will_run(TOKEN, "cold", 0)  # this one loads the model: 3 s of its 3.5 s were the load
    t.responded(TOKEN, "cold", 200)
    t.served(TOKEN, 0, 200, "cold", load_s=3.0, ran_s=3.5)
    assert t.request_s == {KEY: 0.5}
    t.served(TOKEN, 0, 200, "waited", load_s=2.9, ran_s=3.6)  # sent during that load: it waited 2.9 s
    assert t.request_s == {KEY: 0.6} and t.load_s == {KEY: 3.0}  # its wait is no load time of its own
    t.served(TOKEN, 0, 200, "warm-1", ran_s=0.7)
    t.served(TOKEN, 0, 200, "warm-2", ran_s=0.9)
    assert t.request_s == {KEY: 0.7}  # the median of 0.5, 0.7, 0.7 and 0.9
    t.served(TOKEN, 0, 500, "failed", ran_s=60.0)  # a failure says nothing of a slot's time
    t.served(TOKEN, 0, 200, "never-sent")  # no time at all
    assert t.request_s == {KEY: 0.7}
    for i in range(REQUEST_SAMPLES):
        t.served(TOKEN, 0, 200, f"long-{i}", ran_s=10.0)
    assert t.request_s == {KEY: 10.0}  # only the last few count: the early short ones are gone


def agent(
    id: str, *, request_s: float = 0.0, busy: int = 0, warm: bool = True, load_s: float = 0.0
) -> AgentState:
    """``NAME`` (2 GB) on disk, loaded when ``warm``, one slot with ``busy`` requests on it."""
    loaded = (PsModel(name=NAME, model=NAME, size=2 * GB, digest="d", expires_at="", size_vram=2 * GB),)
    return AgentState(
        id=id,
        vendor="nvidia",
        host=id,
        ollama_url=f"http://{id}:11434",
        gpus=(Gpu(index=0, name="gpu", vendor="nvidia", vram_total=24 * GB, vram_free=20 * GB),),
        models=(TagModel(name=NAME, model=NAME, modified_at="", size=2 * GB, digest="d"),),
        loaded=loaded if warm else (),
        parallel=1,
        in_flight=min(busy, 1),
        queued=max(busy - 1, 0),
        request_s={KEY: request_s} if request_s else {},
        load_s={KEY: load_s} if load_s else {},
    )


def test_a_request_takes_the_agents_own_time_else_the_fleets_else_the_typical_one() -> None:
    fast, slow, unseen = agent("fast", request_s=0.2), agent("slow", request_s=1.0), agent("new")
    fleet = observed_times([fast, slow, agent("other", request_s=0.6)])
    assert request_time(KEY, fast, fleet) == 0.2
    assert request_time(KEY, unseen, fleet) == pytest.approx(0.6)  # the median of the three
    assert request_time(KEY, unseen) == TYPICAL_REQUEST_S
    assert request_time(parse_name("qwen3:8b").key, fast, fleet) == TYPICAL_REQUEST_S  # nobody served it
    published = msgspec.json.encode(fast)
    assert agent_state_decoder.decode(published).request_s == {KEY: 0.2}


def test_queue_waits_are_made_of_the_observed_request_time() -> None:
    quick = agent("quick", request_s=0.25, busy=3)
    assert estimate_wait(ROUTE, quick, {}, loads=observed_times([quick])) == pytest.approx(3 * 0.25)
    assert estimate_wait(ROUTE, agent("unseen", busy=3), {}) == pytest.approx(3 * TYPICAL_REQUEST_S)
    # three short requests ahead beat a load of a second and a half elsewhere; three of the typical
    # length do not
    cold = agent("cold", warm=False, load_s=1.5)
    assert [a.id for a in Router().rank("auto", ROUTE, [cold, quick], {})] == ["quick", "cold"]
    assert [a.id for a in Router().rank("auto", ROUTE, [cold, agent("unseen", busy=3)], {})] == [
        "cold",
        "unseen",
    ]
