"""`bench.soak`'s request mix: with a steady set of conversations, chats open with at most that
many openings, as the gateway keys sessions (`corral.gateway.bodies.session`), so the session
caches reach a working set instead of growing for the whole run."""

from __future__ import annotations

import random

import msgspec
from corral.gateway.bodies import decode_view, session

from bench.soak.load import KINDS, body_for

CHATS = [k for k in KINDS if k.method == "POST" and k.path != "/api/generate"]


def session_keys(conversations: int, requests: int) -> set[str]:
    rng, keys = random.Random(7), set()
    for i in range(requests):
        kind = CHATS[i % len(CHATS)]
        body = body_for(kind, rng, conversations)
        assert body is not None
        key, _ = session(body["model"], decode_view(msgspec.json.encode(body)))
        assert key is not None
        keys.add(key)
    return keys


def test_a_steady_set_of_conversations_opens_at_most_that_many_ways_per_kind() -> None:
    keys = session_keys(conversations=16, requests=3000)
    assert len(keys) <= 16 * len(CHATS)  # native chats (with a system message) and /v1 chats differ
    assert len(keys) >= 16  # and the set is used, not one conversation


def test_without_a_set_every_chat_opens_anew() -> None:
    assert len(session_keys(conversations=0, requests=500)) == 500
