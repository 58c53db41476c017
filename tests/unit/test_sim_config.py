"""Simulator settings, keep_alive/duration parsing, option validation, request decoding, text."""

from __future__ import annotations

import math
import random
import re
import threading
import time
import zlib
from pathlib import Path

import pytest
from corral.protocol.errors import BadRequest, InternalError
from corral.simulator import ConfigError, SimConfig, load_config
from corral.simulator.config import GIB
from corral.simulator.durations import (
    FOREVER,
    CreatedAt,
    DurationError,
    format_local,
    parse_go_duration,
    parse_keep_alive,
    parse_server_keep_alive,
)
from corral.simulator.text import OFF_LOOP_BYTES, embed, plan_reply, render_chat, rendered, seed_for, tokenize
from corral.simulator.wire import (
    ChatRequest,
    GenerateRequest,
    ModelRequest,
    check_options,
    decode,
    think_flag,
)

# ---- config -------------------------------------------------------------------------------------


def test_defaults_serve_a_few_models() -> None:
    cfg = load_config()
    pulled = {m.name for m in cfg.models if m.pulled}
    assert {"llama3.2:latest", "qwen3:8b", "all-minilm:latest"} <= pulled
    assert any(not m.pulled for m in cfg.models)
    assert cfg.max_queue == 512 and cfg.keep_alive == "5m"
    assert cfg.max_loaded == 3  # 3 × one GPU
    assert cfg.default_num_ctx == 32768  # 24 GiB tier


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "sim.toml"
    f.write_text(
        """
vendor = "amd"
gpus = [{ name = "MI300X", vram_gb = 192 }, { name = "MI300X", vram_gb = 192 }]
speed = 2.0
num_parallel = 2
time_scale = 0.5
[[models]]
name = "llama3.2:3b"
size_gb = 2.0
parameter_size = "3.2B"
quantization = "Q4_K_M"
family = "llama"
capabilities = ["completion", "tools"]
pulled = true
"""
    )
    cfg = load_config(f, time_scale=0.01, seed=None, num_parallel=4)
    assert cfg.vendor == "amd" and cfg.speed == 2.0
    assert cfg.time_scale == 0.01  # flag wins over file
    assert cfg.num_parallel == 4
    assert cfg.total_vram == 384 * GIB and cfg.max_loaded == 6
    assert cfg.default_num_ctx == 262144
    assert [m.name for m in cfg.models] == ["llama3.2:3b"]
    assert load_config(f, vram_gb=8).gpus[1].vram_gb == 8


@pytest.mark.parametrize(
    "text",
    [
        'vendor = "tpu"',
        "speed = 0",
        "time_scale = -1",
        "bogus = 1",
        '[[models]]\nname = "a"\nsize_gb = 1\n[[models]]\nname = "A:latest"\nsize_gb = 1',
        '[[models]]\nname = "bad name!"\nsize_gb = 1',
        "this is not toml",
        "reply_tokens = [0, 5]",
        "reply_tokens = [9, 5]",
    ],
)
def test_bad_config_is_rejected(tmp_path: Path, text: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError):
        load_config(f)


def test_reply_length_is_configurable() -> None:
    cfg = load_config(None, reply_tokens=(500, 500))
    plan = plan_reply(1, length=cfg.reply_tokens)
    words = [t for t in plan.content if t.strip() not in (".", ",")]
    assert len(words) == 500 and plan.done_reason == "stop"
    capped = plan_reply(1, length=cfg.reply_tokens, num_predict=7)
    assert capped.eval_count == 7 and capped.done_reason == "length"
    default = [t for t in plan_reply(1).content if t.strip() not in (".", ",")]
    assert 20 <= len(default) <= 60


def test_cpu_vendor_has_no_vram() -> None:
    cfg = SimConfig(vendor="cpu")
    assert cfg.total_vram == 0 and cfg.default_num_ctx == 4096


# ---- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("300ms", 0.3),
        ("5m0s", 300.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("300", 'time: missing unit in duration "300"'),
        ("-1", 'time: missing unit in duration "-1"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("abc", 'time: invalid duration "abc"'),
        ("", 'time: invalid duration ""'),
        (True, "Unsupported type: 'bool'"),
        ({}, "Unsupported type: 'map[string]interface {}'"),
    ],
)
def test_keep_alive_errors_use_go_texts(value: object, message: str) -> None:
    with pytest.raises(DurationError) as e:
        parse_keep_alive(value)
    assert str(e.value) == message


def test_keep_alive_values() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(300) == 300.0
    assert parse_keep_alive(0) == 0.0
    assert parse_keep_alive("0") == 0.0
    assert parse_keep_alive(-1) == FOREVER
    assert parse_keep_alive("-1m") == FOREVER
    assert parse_keep_alive("5s") == 5.0
    assert parse_server_keep_alive("300") == 300.0
    assert parse_server_keep_alive("10m") == 600.0


def test_time_formats() -> None:
    stamp = CreatedAt().now()
    assert stamp.endswith("Z") and "T" in stamp and not stamp.endswith("0Z")
    forever = format_local(math.inf)
    assert forever.startswith("23")  # now + MaxInt64 ns ≈ year 2318


# ---- request decoding and options --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "missing request body"),
        (b"  ", "missing request body"),
        (b"x", "invalid character 'x' looking for beginning of value"),
        (b'{"model":', "unexpected EOF"),
        (
            b'{"prompt": 5}',
            "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string",
        ),
        (b"[]", "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
    ],
)
def test_decode_errors_read_like_go(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        decode(body, GenerateRequest)
    assert e.value.message == message


def test_images_that_are_not_base64_are_refused_in_gos_words() -> None:
    body = b'{"model":"x","messages":[{"role":"user","content":"hi","images":["aGk=","no!"]}]}'
    with pytest.raises(BadRequest) as e:
        decode(body, ChatRequest)
    assert e.value.message == "illegal base64 data at input byte 2"
    with pytest.raises(BadRequest):
        decode(b'{"model":"x","prompt":"hi","images":["abc"]}', GenerateRequest)
    assert decode(b'{"model":"x","prompt":"hi","images":["aGk="]}', GenerateRequest).images == ["aGk="]


def test_decode_chat_messages_type_error() -> None:
    with pytest.raises(BadRequest) as e:
        decode(b'{"model":"x","messages":"hi"}', ChatRequest)
    assert e.value.message == (
        "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"
    )


@pytest.mark.parametrize("go_name", ["ShowRequest", "PullRequest", "PushRequest", "DeleteRequest"])
def test_a_shared_request_type_is_named_as_the_go_struct_of_its_route(go_name: str) -> None:
    """Ollama decodes each route's body into its own struct (server/routes.go): the error names it."""
    with pytest.raises(BadRequest) as e:
        decode(b'{"name": true}', ModelRequest, go_name)
    assert (
        e.value.message == f"json: cannot unmarshal bool into Go struct field {go_name}.name of type string"
    )


def test_unknown_fields_are_ignored() -> None:
    req = decode(b'{"model":"m","prompt":"p","width":3,"whatever":{}}', GenerateRequest)
    assert req.model == "m" and req.prompt == "p"


def test_options_validation() -> None:
    assert check_options(
        {"num_ctx": 2048.7, "temperature": 1, "stop": ["x"], "mirostat": 1, "seed": None}
    ) == {
        "num_ctx": 2048,
        "temperature": 1.0,
        "stop": ["x"],
    }
    with pytest.raises(InternalError) as e:
        check_options({"num_ctx": "4096"})
    assert e.value.message == 'option "num_ctx" must be of type integer' and e.value.status == 500
    with pytest.raises(InternalError):
        check_options({"temperature": "hot"})
    with pytest.raises(InternalError):
        check_options({"stop": [1]})


def test_think_defaults() -> None:
    assert think_flag(None, True) is True
    assert think_flag(None, False) is False
    assert think_flag(False, True) is False
    assert think_flag("high", True) is True


# ---- deterministic text -------------------------------------------------------------------------


def test_replies_are_deterministic_per_seed_and_prompt() -> None:
    toks = tokenize("why is the sky blue?")
    a = plan_reply(seed_for(7, toks))
    b = plan_reply(seed_for(7, toks))
    c = plan_reply(seed_for(8, toks))
    assert a == b
    assert a.content != c.content
    assert 20 <= len(a.content) and a.done_reason == "stop"


def test_num_predict_caps_length() -> None:
    plan = plan_reply(1, num_predict=5)
    assert len(plan.content) == 5 and plan.done_reason == "length"


def test_generated_pieces_retokenize_to_one_token_each() -> None:
    plan = plan_reply(3)
    assert len(tokenize("".join(plan.content))) == len(plan.content)


def test_chat_rendering_is_prefix_stable_across_turns() -> None:
    turn1 = [("user", "hello there")]
    reply = "".join(plan_reply(1).content)
    turn2 = [*turn1, ("assistant", reply), ("user", "and then?")]
    first = render_chat(turn1) + tokenize(reply)
    assert render_chat(turn2)[: len(first)] == first


def test_tool_call_when_the_tool_is_mentioned() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        }
    ]
    plan = plan_reply(1, tools=tools, last_user="what does get_weather say for Paris?")
    assert [c.name for c in plan.tool_calls] == ["get_weather"]
    assert set(plan.tool_calls[0].arguments) == {"city"}
    assert plan.tool_calls[0].id.startswith("call_") and len(plan.tool_calls[0].id) == 13
    assert plan.content == []
    assert plan_reply(1, tools=tools, last_user="hello").tool_calls == []


def test_thinking_comes_first_when_on() -> None:
    plan = plan_reply(1, think=True)
    assert plan.thinking and plan.content


def test_embeddings_are_deterministic_and_normalised() -> None:
    v = embed("hello", 384)
    assert v == embed("hello", 384) and v != embed("world", 384)
    assert sum(x * x for x in v) == pytest.approx(1.0)


@pytest.mark.parametrize("value", [10**30, 1e300, "2562048h"])
def test_keep_alive_beyond_a_go_duration_is_forever(value: object) -> None:
    # a Go time.Duration holds MaxInt64 ns (~292 years); longer is forever, and /api/ps can show it
    secs = parse_keep_alive(value)
    assert secs == FOREVER
    assert format_local(time.time() + secs).startswith("23")  # Go's now + MaxInt64 ns


def test_a_reply_of_a_million_tokens_is_as_long_as_asked() -> None:
    """Past a few thousand words a reply repeats the words it drew (drawing a million words at
    random held the simulator's event loop for most of a second); its length is still the one
    asked for."""
    natural = plan_reply(7, length=(10**6, 10**6))
    assert natural.eval_count >= 10**6 and natural.done_reason == "stop"
    assert natural.content[1:100] != natural.content[101:200]  # words, not one word repeated
    assert plan_reply(7, num_predict=654_321, length=(10**6, 10**6)).eval_count == 654_321


async def test_a_large_request_is_tokenized_off_the_event_loop() -> None:
    """A prompt of hundreds of megabytes takes its tokenizer many seconds: in `corral up` the gateway
    and the agents share the simulators' loop, and a frozen loop misses heartbeats (agents taken for
    gone, a 404 for a model they have). A small one is tokenized at once, without a thread's cost."""
    seen: list[int] = []

    def render(text: str) -> list[int]:
        seen.append(threading.get_ident())
        return tokenize(text)

    assert await rendered(100, render, "a b") == tokenize("a b")
    assert await rendered(OFF_LOOP_BYTES, render, "a b") == tokenize("a b")
    assert seen[0] == threading.get_ident() != seen[1]


def test_a_long_text_tokenized_a_slice_at_a_time_gives_the_same_tokens() -> None:
    """Slices are cut at whitespace, so no token spans two; one call reading megabytes would hold
    the interpreter's lock throughout, the event loop's thread waiting."""
    rng = random.Random(7)
    pieces = ["ab", " ", "c.d", "\n", "é", "xyz ", "x" * 1000, "\t"]
    for n in (10, 100_000, 400_000):
        text = "".join(rng.choice(pieces) for _ in range(n))
        assert tokenize(text) == [
            zlib.crc32(w.encode()) % 120_000 + 256 for w in re.findall(r"\w+|[^\w\s]", text)
        ]
