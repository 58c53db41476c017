"""The pure rules of API keys: roles, allow-lists, hashes, the Bearer header, windows and limits,
token counts of a reply, allowed registries, usage keys."""

from __future__ import annotations

import re

import pytest
from corral.gateway.access import (
    ApiKey,
    Window,
    hash_key,
    is_open,
    model_allowed,
    new_key,
    over_limit,
    presented_key,
    reply_tokens,
    retry_after,
    user_may,
    window_of,
)
from corral.gateway.limits import periods, usage_key, usage_model
from corral.protocol.names import InvalidModelName, host_allowed, parse_name, registry_host
from hypothesis import example, given
from hypothesis import strategies as st


def key(**kw: object) -> ApiKey:
    return ApiKey(name="k", hash="h", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/api/show"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/api/status"),
        ("GET", "/api/version"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/llama3.2"),
        ("GET", "/api/corral/whoami"),
    ],
)
def test_a_user_may_infer_and_read(method: str, path: str) -> None:
    assert user_may(method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:" + "0" * 64),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64),
        ("POST", "/api/tags"),
        ("GET", "/v1/models/a/b"),
        ("POST", "/api/drain"),  # a route added later needs an admin until said otherwise
        ("POST", "/api/corral/agents/nvidia-0/drain"),  # the console's admin calls
        ("POST", "/api/corral/agents/nvidia-0/cordon"),
        ("POST", "/api/corral/agents/nvidia-0/uncordon"),
        ("POST", "/api/corral/unload"),
        ("POST", "/api/corral/whoami"),
    ],
)
def test_everything_else_needs_an_admin(method: str, path: str) -> None:
    assert not user_may(method, path)


def test_only_liveness_readiness_and_the_console_pages_answer_without_a_key() -> None:
    for path in ("/", "/ready", "/console", "/console/", "/console/app.js"):
        assert is_open(path), path
    for path in ("/consoles", "/console.js", "/api/status", "/api/corral/whoami", "/ready/x", ""):
        assert not is_open(path), path


def test_allow_lists_match_globs_over_the_short_name() -> None:
    assert model_allowed((), "anything:at-all")
    assert model_allowed(("llama3*",), "llama3.2")
    assert model_allowed(("llama3.2",), "Llama3.2:latest")  # no tag in the pattern: every tag
    assert model_allowed(("llama3.2:1b",), "registry.ollama.ai/library/llama3.2:1b")
    assert not model_allowed(("llama3.2:1b",), "llama3.2")
    assert not model_allowed(("llama3*",), "qwen2:7b")
    assert model_allowed(("hf.co/*",), "hf.co/user/repo:Q4_K_M")
    assert not model_allowed(("llama3*",), "not a name")


def test_keys_are_fresh_and_only_their_hash_is_kept() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("corral-") and len(a) > 40
    assert hash_key(a) == hash_key(a) != hash_key(b)
    assert a not in hash_key(a) and len(hash_key(a)) == 64


def test_the_key_is_read_from_authorization_bearer_or_x_api_key() -> None:
    assert presented_key([(b"authorization", b"Bearer abc")]) == "abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == "abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([(b"authorization", b"Bearer ")]) is None
    assert presented_key([]) is None
    # the anthropic SDK's header, when no Authorization names a key
    assert presented_key([(b"x-api-key", b" k1 "), (b"anthropic-version", b"2023-06-01")]) == "k1"
    assert presented_key([(b"x-api-key", b"k1"), (b"authorization", b"Bearer abc")]) == "abc"
    assert presented_key([(b"x-api-key", b"  ")]) is None


def test_windows_are_whole_minutes() -> None:
    assert window_of(120.0) == window_of(179.9) == 2 != window_of(180.0)
    assert retry_after(120.0) == 60
    assert retry_after(179.2) == 1
    assert retry_after(179.99) == 1  # never 0


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_retry_after_reaches_the_next_window(now: float) -> None:
    wait = retry_after(now)
    assert 1 <= wait <= 60
    assert window_of(now + wait) > window_of(now)


def test_limits() -> None:
    assert over_limit(key(), Window(requests=10**6, tokens=10**9)) is None  # 0: no limit
    assert over_limit(key(rpm=2), Window(requests=1)) is None
    assert "2 requests per minute" in (over_limit(key(rpm=2), Window(requests=2)) or "")
    assert "100 tokens per minute" in (over_limit(key(tpm=100), Window(tokens=100)) or "")
    assert over_limit(key(tpm=100), Window(tokens=99)) is None


def test_reply_tokens_native_v1_and_mid_object() -> None:
    ndjson = b'{"response":"a","done":false}\n{"done":true,"prompt_eval_count":12,"eval_count":30}\n'
    assert reply_tokens(ndjson) == (12, 30)
    sse = b'data: {"choices":[]}\n\ndata: {"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\ndata: [DONE]\n\n'
    assert reply_tokens(sse) == (5, 7)
    assert reply_tokens(b'0.5, 0.25],"prompt_eval_count":4,"eval_count":0}') == (4, 0)  # a cut tail
    assert reply_tokens(b'{"response":"say \\"eval_count\\": 99"}') == (0, 0)  # inside a string
    assert reply_tokens(b'{"say \\"eval_count": 5}') == (0, 0)  # the end of a key that quotes one
    assert reply_tokens(b"") == (0, 0)
    # Anthropic's stream: an estimate first, the counts in its message_delta; the Responses API's usage
    anthropic = (
        b'event: message_start\ndata: {"message":{"usage":{"input_tokens":3,"output_tokens":0}}}\n\n'
        b'event: message_delta\ndata: {"usage":{"input_tokens":11,"output_tokens":6}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert reply_tokens(anthropic) == (11, 6)
    responses = b'"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4}'
    assert reply_tokens(responses) == (9, 4)


# The rule reply_tokens keeps, as one expression (what it was written as before it searched with rfind)
_COUNT_RULE = re.compile(
    rb'(?<!\\)"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|input_tokens|output_tokens)"'
    rb"\s*:\s*(\d+)"
)
_PIECES = [
    b'"prompt_eval_count"', b'"eval_count"', b'"prompt_tokens"', b'"completion_tokens"', b'"input_tokens"',
    b'"output_tokens"', b"\\", b":", b" ", b"\n", b"7", b"42", b'"', b"{", b"}", b",", b"x", b"_count",
]  # fmt: skip


def _by_rule(tail: bytes) -> tuple[int, int]:
    found = {m.group(1): int(m.group(2)) for m in _COUNT_RULE.finditer(tail)}
    prompt = found.get(b"prompt_eval_count", found.get(b"prompt_tokens", found.get(b"input_tokens", 0)))
    generated = found.get(b"eval_count", found.get(b"completion_tokens", found.get(b"output_tokens", 0)))
    return prompt, generated


@given(st.lists(st.sampled_from(_PIECES), max_size=40))
@example([b'"eval_count"', b":", b"7", b"\\", b'"eval_count"', b":", b"42"])  # the last one is escaped
@example([b'"eval_count"', b":", b"7", b'"eval_count"', b":", b"x"])  # the last one has no number
def test_reply_tokens_reads_what_the_rule_reads(pieces: list[bytes]) -> None:
    tail = b"".join(pieces)
    assert reply_tokens(tail) == _by_rule(tail)


def test_allowed_registries() -> None:
    allowed = ("registry.ollama.ai", "hf.co")

    def pulls_from_allowed(name: str, hosts: tuple[str, ...] = allowed) -> bool:
        return host_allowed(parse_name(name).host, hosts)

    assert pulls_from_allowed("llama3.2")
    assert pulls_from_allowed("hf.co/user/repo:Q4")
    assert pulls_from_allowed("HF.CO/user/repo")
    assert not pulls_from_allowed("evil.example:5000/library/x")
    assert not pulls_from_allowed("http://10.0.0.1:8080/a/b")
    assert not pulls_from_allowed("https://evil.example/a/b:latest")
    assert pulls_from_allowed("https://hf.co/a/b")
    assert pulls_from_allowed("mirror:5000/a/b", ("mirror:5000",))
    assert host_allowed("HF.co", (" hf.CO ",))  # both sides case-insensitive, listed hosts trimmed
    with pytest.raises(InvalidModelName):
        registry_host("not//valid")  # refused before any host is looked at


def test_usage_keys_are_kv_keys_and_name_their_model() -> None:
    hour, day = periods(1_700_000_000.0)
    assert (hour, day) == ("2023-11-14T22", "2023-11-14")
    k = usage_key("alice", "llama3.2:latest", hour)
    assert k == "alice.llama3=2E2=3Alatest.h2023111422"
    assert usage_model(k.split(".")[1]) == "llama3.2:latest"
    assert usage_key("alice", "", day) == "alice.-.d20231114"
    assert usage_model("-") == ""
