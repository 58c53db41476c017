"""Deterministic text: a toy tokenizer, chat templating, lorem-like replies, tool calls, embeddings.

Everything is a pure function of its inputs and a seed, so tests can assert on outputs. The
tokenizer is stable under concatenation of generated pieces (each piece is one token and
re-tokenises to itself), which is what makes a chat's next turn hit the slot's prompt cache.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import string
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")

_WORDS: Final = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
    "et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip "
    "ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla "
    "pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim "
    "id est laborum"
).split()
_THOUGHTS: Final = (
    "okay let me think about this the user wants to know so first I should consider what matters here "
    "and then answer clearly"
).split()

BOS: Final = 1
EOT: Final = 2
_ROLE_TOKENS: Final = {"system": 3, "user": 4, "assistant": 5, "tool": 6}


def tokenize(text: str) -> list[int]:
    return [zlib.crc32(w.encode()) % 120_000 + 256 for w in _pieces(text)]


def count_tokens(text: str) -> int:
    return len(_pieces(text))


_SLICE: Final = 1 << 18  # characters a regex call reads at once (it holds the interpreter's lock)
_SPACE: Final = re.compile(r"\s")


def _pieces(text: str) -> list[str]:
    """The text's tokens; a long text read a slice at a time, cut at whitespace (no token spans
    it), so a thread tokenizing megabytes lets the event loop's thread run between slices."""
    if len(text) <= _SLICE:
        return _TOKEN_RE.findall(text)
    out: list[str] = []
    start = 0
    while start < len(text):
        end = start + _SLICE
        if end < len(text):
            space = _SPACE.search(text, end)
            end = space.start() if space else len(text)
        out += _TOKEN_RE.findall(text, start, end)
        start = end
    return out


# a request body this large is tokenized in a worker thread: the event loop (in `corral up`, the
# gateway's and the agents' too) keeps turning, its heartbeats included, however long that takes
OFF_LOOP_BYTES = 1 << 20


async def rendered(body_size: int | None, render: Callable[..., list[int]], *args: Any) -> list[int]:
    """``render(*args)``: at once for a small request, in a thread for one of `OFF_LOOP_BYTES` or more."""
    if (body_size or 0) < OFF_LOOP_BYTES:
        return render(*args)
    return await asyncio.to_thread(render, *args)


def render_generate(
    prompt: str, system: str = "", context: Sequence[int] = (), raw: bool = False
) -> list[int]:
    """Token ids of a generate prompt after "templating": context, system, prompt, assistant header."""
    if raw:
        return [*context, *tokenize(prompt)]
    out: list[int] = [*context] if context else [BOS]
    if system:
        out += [_ROLE_TOKENS["system"], *tokenize(system), EOT]
    out += [_ROLE_TOKENS["user"], *tokenize(prompt), EOT, _ROLE_TOKENS["assistant"]]
    return out


def render_chat(messages: Sequence[tuple[str, str]], tools: Sequence[Any] = ()) -> list[int]:
    """Token ids of a chat: BOS, [tools], each (role, content) framed, then an assistant header.

    A turn's rendering is a prefix of the next turn's (prompt + reply), so prompt caching works.
    """
    out = [BOS]
    if tools:
        out += [_ROLE_TOKENS["system"], *tokenize(msgspec.json.encode(list(tools)).decode()), EOT]
    for role, content in messages:
        out += [_ROLE_TOKENS.get(role, 4), *tokenize(content), EOT]
    out.append(_ROLE_TOKENS["assistant"])
    return out


def seed_for(seed: int, tokens: Sequence[int]) -> int:
    return zlib.crc32(array("q", tokens).tobytes(), seed & 0xFFFFFFFF)


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: dict[str, Any]


class Plan(msgspec.Struct, kw_only=True):
    """What a completion will produce, decided before the first token."""

    thinking: list[str]
    content: list[str]
    tool_calls: list[ToolCall]
    done_reason: str  # "stop" | "length"

    @property
    def eval_count(self) -> int:
        return len(self.thinking) + len(self.content) + len(self.tool_calls) * 8


_DRAWN = 4096  # words drawn at random; a longer reply repeats them (a long reply's planning would
# otherwise hold the event loop: a million words took 0.6 s)


def _words(rng: random.Random, n: int, vocab: Sequence[str]) -> list[str]:
    if n > _DRAWN:
        drawn = _words(rng, _DRAWN, vocab)
        times, rest = divmod(n, _DRAWN)
        return drawn * times + drawn[:rest]
    out: list[str] = []
    cap = True
    for i in range(n):
        w = vocab[rng.randrange(len(vocab))]
        if cap:
            w = w.capitalize()
            cap = False
        out.append(w if i == 0 else " " + w)
        if i < n - 1 and i > 2:
            r = rng.random()
            if r < 0.08:
                out.append(".")
                cap = True
            elif r < 0.14:
                out.append(",")
    return out


def _value_for(schema: Mapping[str, Any], rng: random.Random, key: str = "") -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    typ = schema.get("type", "string")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "string")
    if typ == "integer":
        return rng.randrange(1, 100)
    if typ == "number":
        return round(rng.uniform(0, 100), 2)
    if typ == "boolean":
        return True
    if typ == "array":
        items = schema.get("items")
        return [_value_for(items if isinstance(items, Mapping) else {}, rng)]
    if typ == "object":
        return _object_for(schema, rng)
    if key in ("city", "location"):
        return ("Paris", "Tokyo", "Lima", "Oslo")[rng.randrange(4)]
    return _WORDS[rng.randrange(len(_WORDS))]


def _object_for(schema: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        return {}
    required = schema.get("required")
    keys = [k for k in props if not isinstance(required, list) or not required or k in required]
    return {k: _value_for(props[k] if isinstance(props[k], Mapping) else {}, rng, k) for k in keys}


def _tool_call(tools: Sequence[Any], last_user: str, rng: random.Random) -> ToolCall | None:
    text = last_user.lower()
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping):
            continue
        name = fn.get("name")
        if isinstance(name, str) and name and name.lower() in text:
            params = fn.get("parameters")
            args = _object_for(params if isinstance(params, Mapping) else {}, rng)
            ident = "call_" + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            return ToolCall(id=ident, name=name, arguments=args)
    return None


def _json_pieces(text: str) -> list[str]:
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def plan_reply(
    seed: int,
    *,
    num_predict: int = -1,
    think: bool = False,
    tools: Sequence[Any] = (),
    last_user: str = "",
    last_role: str = "user",
    fmt: Any = None,
    stop: Sequence[str] = (),
    length: tuple[int, int] = (20, 60),
) -> Plan:
    """Decide a reply: optional thinking, then a tool call or text of `length` tokens (or `num_predict`)."""
    rng = random.Random(seed)
    thinking = _words(rng, rng.randrange(8, 30), _THOUGHTS) if think else []
    natural = rng.randrange(length[0], length[1] + 1)
    calls: list[ToolCall] = []
    if tools and last_role == "user":
        call = _tool_call(tools, last_user, rng)
        if call is not None:
            calls.append(call)
    content: list[str] = []
    if not calls:
        if fmt == "json":
            obj: Any = {"response": "".join(_words(rng, 6, _WORDS))}
            content = _json_pieces(msgspec.json.encode(obj).decode())
        elif isinstance(fmt, Mapping):
            content = _json_pieces(msgspec.json.encode(_object_for(fmt, rng)).decode())
        else:
            content = _words(rng, natural, _WORDS)
            content.append(".")
    reason = "stop"
    if stop and content:
        text = "".join(content)
        cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
        if cut >= 0:
            acc = 0
            kept: list[str] = []
            for p in content:
                if acc + len(p) > cut:
                    break
                kept.append(p)
                acc += len(p)
            content = kept
    if 0 <= num_predict < len(thinking) + len(content) + len(calls):
        budget = num_predict
        thinking = thinking[:budget]
        content = content[: max(0, budget - len(thinking))]
        calls = calls if budget > len(thinking) + len(content) else []
        reason = "length"
    return Plan(thinking=thinking, content=content, tool_calls=calls, done_reason=reason)


def weights_seed(model: str) -> int:
    """The seed of a model's embeddings (by its weights' name, so a copy embeds alike): the same
    model gives the same vector on every server, as real ones do, and two models differ."""
    return zlib.crc32(model.encode())


def embed(text: str, dim: int, seed: int = 0, *, normalize: bool = True) -> list[float]:
    """A deterministic pseudo-embedding: equal texts give equal vectors (for one ``seed``)."""
    rng = random.Random(zlib.crc32(text.encode(), seed & 0xFFFFFFFF))
    vec = [rng.random() * 2.0 - 1.0 for _ in range(dim)]
    if not normalize:
        return vec
    return l2_normalize(vec)


def l2_normalize(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
