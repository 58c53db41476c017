"""The registry's placement reads a load marker it cannot read as "unknown", never as "missing":
a KV timeout must not start a second load of a model whose first load may be under way."""

from __future__ import annotations

from typing import Any

import msgspec
import nats.errors
import pytest
from corral.protocol.messages import AgentState, PlaceRequest, TagModel, place_reply_decoder
from corral.protocol.subjects import Subjects
from corral.registry.placement import Placer
from nats.js.errors import KeyNotFoundError

MODEL = "llama3.2:latest"


def holder(agent_id: str) -> AgentState:
    tag = TagModel(name=MODEL, model=MODEL, modified_at="", size=1, digest="d")
    return AgentState(id=agent_id, vendor="nvidia", host="h", ollama_url="http://h", models=(tag,))


class Fleet:
    def __init__(self, *agents: AgentState) -> None:
        self._agents = {a.id: a for a in agents}

    def with_model(self, key: str) -> list[AgentState]:
        return list(self._agents.values())

    def get(self, agent_id: str) -> AgentState | None:
        return self._agents.get(agent_id)

    def alive(self, state: AgentState) -> bool:
        return True


class KV:
    """A models bucket whose reads fail with ``error``; records the markers written."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.created: list[str] = []

    async def get(self, key: str) -> Any:
        raise self.error

    async def create(self, key: str, value: bytes) -> int:
        self.created.append(key)
        return 1


class Msg:
    def __init__(self, data: bytes) -> None:
        self.data, self.reply, self.answers = data, "inbox", []

    async def respond(self, data: bytes) -> None:
        self.answers.append(data)


def placer(kv: KV) -> Placer:
    return Placer(None, Subjects("t"), Fleet(holder("a"), holder("b")), kv, None)  # type: ignore[arg-type]


async def test_a_missing_marker_lets_the_asker_load() -> None:
    kv = KV(KeyNotFoundError())
    answer = await placer(kv).place(MODEL, "tok", None, False, None, proposal="a")
    assert answer.mine and answer.agent in ("a", "b") and len(kv.created) == 1


async def test_a_marker_that_cannot_be_read_starts_no_load() -> None:
    kv = KV(nats.errors.TimeoutError())
    with pytest.raises(nats.errors.TimeoutError):
        await placer(kv).place(MODEL, "tok", None, False, None, proposal="a")
    assert kv.created == []
    ask = PlaceRequest(model=MODEL, token="tok", proposal="a")
    msg = Msg(msgspec.json.encode(ask))
    await placer(kv).on_place(msg)  # type: ignore[arg-type]
    (answer,) = (place_reply_decoder.decode(a) for a in msg.answers)
    assert answer.agent == "a" and not answer.mine  # wait for the proposal; load nothing
    assert kv.created == []
