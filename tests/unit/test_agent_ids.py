"""`id_clash`: an agent may not join under an id a live agent of another host or Ollama holds; its
own state, left by the run before a restart, or a member's gone quiet, does not stop it.
`displaced_by`: of two processes writing under one id, the later gives way."""

from __future__ import annotations

import msgspec
from corral.protocol.messages import AgentState
from corral.runtime.fleet import FRESH_HEARTBEATS, displaced_by, id_clash

HEARTBEAT_S = 5.0


def state(host: str = "box-1", url: str = "http://127.0.0.1:11434", started_at: float = 0.0) -> AgentState:
    return msgspec.convert(
        {"id": "box-11434", "vendor": "nvidia", "host": host, "ollama_url": url, "started_at": started_at},
        AgentState,
    )


def test_a_live_agent_of_another_host_or_ollama_holds_its_id() -> None:
    me = state()
    why = id_clash(state(host="box-2"), me, 1.0, HEARTBEAT_S)
    assert why is not None and "in use by a live agent on box-2" in why and "--id" in why
    assert id_clash(state(url="http://127.0.0.1:11435"), me, 1.0, HEARTBEAT_S) is not None


def test_its_own_state_a_gone_members_or_none_does_not() -> None:
    me = state()
    assert id_clash(None, me, 1.0, HEARTBEAT_S) is None
    assert id_clash(state(), me, 1.0, HEARTBEAT_S) is None  # this agent, restarted at once
    quiet = FRESH_HEARTBEATS * HEARTBEAT_S
    assert id_clash(state(host="box-2"), me, quiet, HEARTBEAT_S) is None
    assert id_clash(state(host="box-2"), me, quiet - 0.1, HEARTBEAT_S) is not None


def test_of_two_processes_under_one_id_the_later_gives_way() -> None:
    why = displaced_by(state(host="box-2", started_at=1000.0), 1030.0)
    assert why is not None and "in use by another agent process on box-2" in why
    assert "30s before this one" in why and "--id" in why
    assert displaced_by(state(started_at=1030.0), 1000.0) is None  # the other is the later: it goes
    assert displaced_by(state(started_at=1000.0), 1000.0) is None  # its own write, answered late
    assert displaced_by(None, 1000.0) is None  # deleted (taken for dead), or not an agent's state
