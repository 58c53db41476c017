"""What the gateway routes on beyond the model: session keys, num_ctx, runner matching."""

from __future__ import annotations

import msgspec
from corral.gateway import bodies
from corral.protocol.envelope import MAX_NUM_CTX
from corral.protocol.messages import AgentState, PsModel
from corral.protocol.runners import effective_ctx
from corral.routing import Route, runner_matches, warm

KEY = "llama3.2:latest"


def _view(**body: object) -> bodies.RouteView:
    return bodies.decode_view(msgspec.json.encode({"model": "llama3.2", **body}))


def _chat(*messages: tuple[str, str]) -> bodies.RouteView:
    return _view(messages=[{"role": r, "content": c} for r, c in messages])


def test_every_turn_of_a_chat_has_the_same_session_key() -> None:
    first, follow = bodies.session(KEY, _chat(("system", "be brief"), ("user", "hi")))
    assert first is not None and not follow
    again, follow = bodies.session(
        KEY, _chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "more"))
    )
    assert again == first and follow


def test_different_openings_models_or_no_user_message() -> None:
    a, _ = bodies.session(KEY, _chat(("user", "hi")))
    b, _ = bodies.session(KEY, _chat(("user", "hello")))
    c, _ = bodies.session("qwen3:8b", _chat(("user", "hi")))
    assert len({a, b, c}) == 3
    assert bodies.session(KEY, _chat(("system", "only a system prompt"))) == (None, False)
    assert bodies.session(KEY, _view(prompt="generate has no messages")) == (None, False)


def test_only_the_opening_is_decoded() -> None:
    # a later message that is not even an object does not matter: only the opening is read
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"},42]}'
    key, follow = bodies.session(KEY, bodies.decode_view(body))
    assert key is not None and follow


def test_num_ctx_is_read_when_it_is_a_number() -> None:
    assert bodies.num_ctx(_view(options={"num_ctx": 8192})) == 8192
    assert bodies.num_ctx(_view(options={"num_ctx": 8192.9})) == 8192  # Ollama truncates floats
    assert bodies.num_ctx(_view(options={"num_ctx": "8192"})) is None  # Ollama's own 500 follows
    # past any trained context: Ollama clamps it to the model's, so the gateway carries it clamped
    assert bodies.num_ctx(_view(options={"num_ctx": 2**31 - 1})) == MAX_NUM_CTX
    assert bodies.num_ctx(_view(options={"num_ctx": 1e300})) == MAX_NUM_CTX
    # past float's range: Ollama's decoder refuses it, in its own words
    assert bodies.num_ctx(bodies.decode_view(b'{"options":{"num_ctx":1e400}}')) is None
    # below 4: Ollama raises it to 4, a runner of its own, never the default context's
    for small in (-1, 0, 3, 3.9):
        assert bodies.num_ctx(_view(options={"num_ctx": small})) == 4, small
    assert bodies.num_ctx(_view(options={"temperature": 0})) is None
    assert bodies.num_ctx(_view()) is None
    assert bodies.num_ctx(_view(options=None)) is None


def _agent(ctx: int, *, default: int = 32768, trained: int = 131072) -> AgentState:
    runner = PsModel(name=KEY, model=KEY, size=1, digest="d", expires_at="", size_vram=1, context_length=ctx)
    return AgentState(
        id="a",
        vendor="nvidia",
        host="h",
        ollama_url="u",
        loaded=(runner,),
        default_num_ctx=default,
        trained_ctx={KEY: trained},
    )


def test_a_runner_matches_the_requested_or_default_context() -> None:
    assert warm(Route(key=KEY), _agent(32768))
    assert not warm(Route(key=KEY), _agent(8192))
    assert warm(Route(key=KEY, num_ctx=8192), _agent(8192))
    assert not warm(Route(key=KEY, num_ctx=8192), _agent(32768))
    assert not warm(Route(key="other:latest"), _agent(32768))


def test_the_trained_context_caps_what_a_runner_gets() -> None:
    # an embedding model trained on 512 tokens runs at 512 whatever the default says
    small = _agent(512, trained=512)
    assert effective_ctx(32768, 512) == 512 and effective_ctx(2048, 0) == 2048
    assert runner_matches(Route(key=KEY), small, small.loaded[0])
    assert runner_matches(Route(key=KEY, num_ctx=4096), small, small.loaded[0])
