"""What a peer on NATS can make Corral's services do: answer only under the root, ask an Ollama only
what Ollama serves, and believe an agent's state only under its own key."""

from __future__ import annotations

import msgspec
import pytest
from corral.protocol.endpoints import MODEL_ENDPOINTS, remote_refused, served
from corral.protocol.messages import AgentState, agent_state_of
from corral.protocol.subjects import Subjects, usable_reply

DIGEST = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("method", "endpoint"),
    [("POST", e) for e in sorted(MODEL_ENDPOINTS)]
    + [
        ("POST", "/api/pull"),
        ("POST", "/api/create"),
        ("DELETE", "/api/delete"),
        ("GET", "/api/tags"),
        ("POST", f"/api/blobs/{DIGEST}"),
        ("HEAD", f"/api/blobs/{DIGEST.replace(':', '-')}"),
        ("GET", "/v1/models/llama3.2:latest"),
    ],
)
def test_ollama_endpoints_are_served(method: str, endpoint: str) -> None:
    assert served(method, endpoint)


@pytest.mark.parametrize(
    ("method", "endpoint"),
    [
        ("GET", "/api/generate"),  # a known path with another method
        ("DELETE", "/api/tags"),
        ("POST", "/api/anything"),
        ("PUT", "/api/pull"),
        ("POST", "/api/blobs/"),
        ("DELETE", f"/api/blobs/{DIGEST}"),
        ("POST", "/api/blobs/sha256:short"),
        ("GET", "/v1/models/a/b"),
        ("POST", "/v1/files"),
    ],
)
def test_anything_else_is_not(method: str, endpoint: str) -> None:
    assert not served(method, endpoint)


def test_replies_go_only_under_the_root() -> None:
    s = Subjects("corral")
    assert s.is_reply(s.reply("gw1", "abc"))
    for subject in ("_INBOX.x", "corral.agent.a1.ctl", "other.reply.gw.1", "$KV.corral_agents.a1", None, ""):
        assert not s.is_reply(subject)


def test_no_reply_ever_goes_to_a_system_subject() -> None:
    assert usable_reply("_INBOX.abc.def")
    for subject in ("$KV.corral_agents.victim", "$JS.API.STREAM.DELETE.corral_queue", "$SYS.REQ.SERVER.PING"):
        assert not usable_reply(subject)


def test_an_agent_state_is_believed_only_under_its_own_key() -> None:
    value = msgspec.json.encode(AgentState(id="a1", host="h", vendor="cpu", ollama_url="http://x"))
    assert agent_state_of("a1", value).id == "a1"
    with pytest.raises(msgspec.DecodeError):
        agent_state_of("victim", value)
    with pytest.raises(msgspec.DecodeError):
        agent_state_of("a1", b"{}")


@pytest.mark.parametrize(
    ("endpoint", "body", "refused"),
    [
        ("/api/pull", b'{"model": "llama3.2"}', False),
        ("/api/pull", b'{"name": "hf.co/a/b"}', False),
        ("/api/pull", b'{"model": "10.0.0.1:8080/a/b", "insecure": true}', True),
        ("/api/push", b'{"model": "evil.example/library/x"}', True),
        ("/api/create", b'{"model": "mine", "from": "https://evil.example/a/b"}', True),
        ("/api/create", b'{"model": "mine", "from": "llama3.2"}', False),
        ("/api/generate", b'{"model": "evil.example/a/b"}', False),  # runs only what is on disk
        ("/api/pull", b"not json", False),  # Ollama words that error itself
    ],
)
def test_pull_push_and_create_reach_only_allowed_registries(
    endpoint: str, body: bytes, refused: bool
) -> None:
    why = remote_refused(endpoint, body, ("registry.ollama.ai", "hf.co"))
    assert (why is not None) == refused, why
