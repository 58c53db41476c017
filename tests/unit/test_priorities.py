"""Request priority: the header's values, a key's cap, and the lanes' subjects."""

from __future__ import annotations

import pytest
from corral.protocol.errors import BadRequest
from corral.protocol.priority import BATCH, capped, parse_priority
from corral.protocol.subjects import Subjects


def test_the_header_takes_either_priority_in_any_case_and_nothing_else() -> None:
    assert parse_priority(" Batch ") == "batch"
    assert parse_priority("INTERACTIVE") == "interactive"
    with pytest.raises(BadRequest, match="interactive or batch"):
        parse_priority("urgent")


def test_a_key_caps_what_its_requests_get() -> None:
    assert capped(None, "interactive") == "interactive"
    assert capped(None, "batch") == "batch"  # a batch key's requests are batch by default
    assert capped("interactive", "batch") == "batch"  # ... and cannot ask for more
    assert capped("batch", "interactive") == "batch"  # anyone may ask for less


def test_batch_lanes_keep_the_model_token_last_and_stay_apart_from_interactive_ones() -> None:
    s = Subjects("r")
    assert s.work("any", "m") == "r.work.any.m"
    assert s.work("amd", "m", BATCH) == "r.work.batch.amd.m"
    assert s.queue("any", "m") == "r.queue.any.m"
    assert s.queue("nvidia", "m", BATCH) == "r.queue.batch.nvidia.m"
    assert s.queue("any", "m", BATCH).startswith(s.queue_all[:-1])  # in the same stream
    with pytest.raises(ValueError):
        s.work("batch", "m")  # "batch" is not a vendor: the lanes cannot collide


def test_batch_work_waiting_weighs_only_on_batch_requests_when_loads_are_weighed() -> None:
    """The planner weighs a load elsewhere against the wait in the fleet queue: waiting batch work
    does not make an interactive request load a model elsewhere, since it goes before that work."""
    from types import SimpleNamespace

    from corral.gateway.queueing import FleetQueue
    from corral.gateway.settings import GatewaySettings
    from corral.protocol.messages import AgentState, PsModel
    from corral.routing import Route

    runner = PsModel(name="m:latest", model="m:latest", size=1, digest="d", expires_at="", size_vram=1)
    agent = AgentState(id="a", vendor="nvidia", host="h", ollama_url="http://h", loaded=(runner,))
    transport = SimpleNamespace(outstanding={"a": 1}, nc=SimpleNamespace(jetstream=lambda: None))
    queue = FleetQueue(transport, None, None, GatewaySettings())  # type: ignore[arg-type]
    route = Route(key="m:latest")
    queue._count("m:latest", "batch", +6)
    assert queue.with_queue(route, [agent]) == {"a": 1}  # interactive: batch work does not count
    assert queue.with_queue(route, [agent], "batch") == {"a": 7}
    queue._count("m:latest", "interactive", +2)
    assert queue.with_queue(route, [agent]) == {"a": 3}
    queue._count("m:latest", "batch", -6)
    queue._count("m:latest", "interactive", -2)
    assert queue._waiting == {}  # nothing left behind once every wait ended
