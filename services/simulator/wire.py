"""Request bodies as Ollama's Go server sees them: typed decoding with Go's error texts, and options.

`decode(body, T)` raises `BadRequest` with the message Go's encoding/json would produce
(``missing request body``, ``invalid character 'x' looking for beginning of value``,
``json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message``).
`runner_and_sampling(options, ...)` validates `options` like Ollama's `api.Options.FromMap`: wrong
types are a 500 ``option "num_ctx" must be of type integer``; unknown keys are ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from typing import Any, Final, TypeVar

import msgspec
from corral.protocol.errors import BadRequest, InternalError
from corral.protocol.gojson import as_go_reads, base64_error, first_value, fold_keys, syntax_message
from corral.protocol.gojson import kind as go_kind

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)


class _Req(msgspec.Struct, kw_only=True):
    pass


class GenerateRequest(_Req):
    model: str | None = None
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool | None = None
    raw: bool | None = None
    format: Any = None
    keep_alive: Any = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class Message(_Req):
    role: str | None = None
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(_Req):
    model: str | None = None
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    stream: bool | None = None
    format: Any = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class EmbedRequest(_Req):
    model: str | None = None
    input: Any = None
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class EmbeddingsRequest(_Req):
    model: str | None = None
    prompt: str | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class ModelRequest(_Req):
    """show / pull / push / delete: `model`, alias `name`."""

    model: str | None = None
    name: str | None = None
    verbose: bool | None = None
    insecure: bool | None = None
    stream: bool | None = None

    @property
    def target(self) -> str:
        return self.model or self.name or ""


class CopyRequest(_Req):
    source: str | None = None
    destination: str | None = None


class CreateRequest(_Req):
    model: str | None = None
    name: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    quantize: str | None = None
    stream: bool | None = None

    @property
    def target(self) -> str:
        return self.model or self.name or ""


_GO_TYPES: Final[dict[str, str]] = {
    "messages": "[]api.Message",
    "tools": "api.Tools",
    "options": "map[string]interface {}",
    "context": "[]int",
    "images": "[]api.ImageData",
    "tool_calls": "[]api.ToolCall",
    "files": "map[string]string",
    "parameters": "map[string]interface {}",
    "top_logprobs": "int",
    "dimensions": "int",
    "think": "api.ThinkValue",
}
_JSON_KIND: Final = {"int": "number", "float": "number", "str": "string", "bool": "bool", "array": "array"}
_EXPECTED: Final = {"str": "string", "int": "int", "bool": "bool", "float": "float64"}
_GOT_RE: Final = re.compile(r"Expected `([^`]+)`, got `([^`]+)`(?: - at `\$(.*)`)?")


def decode(body: bytes, t: type[T], go_name: str = "") -> T:
    """``body`` as a ``t``; ``go_name``: the Go struct Ollama decodes it into, where ``t``'s own
    name is not it (`ModelRequest` serves show, pull, push and delete)."""
    if not body.strip():
        raise BadRequest("missing request body")
    if body.strip() == b"null":
        return t()  # Go leaves the struct as it was: every field unset
    try:
        req = msgspec.json.decode(body, type=t)
    except msgspec.ValidationError as e:
        raise BadRequest(_validation_message(str(e), go_name or t.__name__)) from None
    except msgspec.DecodeError as e:
        fixed = as_go_reads(body)  # invalid UTF-8, lone surrogate escapes: U+FFFD, as Go reads them
        if fixed != body:
            return decode(fixed, t, go_name)
        first = first_value(body)  # text after the JSON value: Go's decoder leaves it unread
        if first is not None and first != body.strip():
            return decode(first, t, go_name)
        raise BadRequest(syntax_message(str(e), body)) from None
    if (folded := _folded(body, t)) is not None:
        return decode(folded, t, go_name)
    _check_images(req)
    return req


_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])


def decode_object(raw: bytes, fields: Collection[str]) -> dict[str, Any]:
    """A body as Ollama's OpenAI middleware binds it: Go's decoder's errors in its words, the JSON
    value without what follows it, the keys of ``fields`` matched ignoring letter case."""
    if not raw.strip():
        raise BadRequest("EOF")  # Go's decoder found no value
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        fixed = as_go_reads(raw)  # invalid UTF-8, lone surrogate escapes: read as Go reads them
        try:
            body = msgspec.json.decode(first_value(fixed) or raw)
        except msgspec.DecodeError:
            raise BadRequest(syntax_message(str(e), raw)) from None
    if not isinstance(body, dict):
        raise BadRequest("invalid request body")
    return fold_keys(body, fields) or body


def _folded(body: bytes, t: type[msgspec.Struct]) -> bytes | None:
    """``body`` with its keys spelt as ``t``'s fields where they differ only in letter case (Go
    matches them so: `corral.protocol.gojson.fold_keys`); None when none does (or it is no object)."""
    try:
        obj = _OBJECT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    folded = fold_keys(obj, t.__struct_encode_fields__)
    return None if folded is None else msgspec.json.encode(folded)


def _check_images(req: object) -> None:
    """Images are Go ``[]byte``: base64 text, refused in Go's words when it is not."""
    images = list(getattr(req, "images", None) or [])
    for m in getattr(req, "messages", None) or []:
        images += m.images or []
    for image in images:
        if (why := base64_error(image)) is not None:
            raise BadRequest(why)


def _validation_message(msg: str, struct: str) -> str:
    m = _GOT_RE.search(msg)
    if not m:
        return "json: " + msg
    expected, got, path = m.group(1), m.group(2), m.group(3) or ""
    expected = expected.removesuffix(" | null")
    kind = _JSON_KIND.get(got, "object" if got == "object" else got)
    if not path:
        return f"json: cannot unmarshal {kind} into Go value of type api.{struct}"
    parts = [p for p in re.split(r"\.|\[\d+\]", path) if p]
    field = parts[0] if parts else ""
    gotype = _GO_TYPES.get(field, _EXPECTED.get(expected, expected))
    return f"json: cannot unmarshal {kind} into Go struct field {struct}.{'.'.join(parts)} of type {gotype}"


# ---- options ----------------------------------------------------------------------------------

_INT_OPTS: Final = frozenset(
    "num_ctx num_batch num_gpu main_gpu num_thread num_keep seed num_predict top_k repeat_last_n "
    "draft_num_predict".split()
)
_FLOAT_OPTS: Final = frozenset(
    "top_p min_p typical_p temperature repeat_penalty presence_penalty frequency_penalty".split()
)
_BOOL_OPTS: Final = frozenset({"use_mmap"})


class Sampling(msgspec.Struct, kw_only=True):
    seed: int | None = None
    num_predict: int = -1
    stop: list[str] = msgspec.field(default_factory=list)
    temperature: float = 0.8


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Validated known options (ints truncated from floats); unknown keys dropped with a warning."""
    out: dict[str, Any] = {}
    if not options:
        return out
    for key, val in options.items():
        if val is None:
            continue
        if key in _INT_OPTS:
            if isinstance(val, bool) or not isinstance(val, int | float):
                raise InternalError(f'option "{key}" must be of type integer')
            out[key] = int(val)
        elif key in _FLOAT_OPTS:
            if isinstance(val, bool) or not isinstance(val, int | float):
                raise InternalError(f'option "{key}" must be of type float32')
            out[key] = float(val)
        elif key in _BOOL_OPTS:
            if not isinstance(val, bool):
                raise InternalError(f'option "{key}" must be of type boolean')
            out[key] = val
        elif key == "stop":
            if not isinstance(val, list):
                raise InternalError(f'option "{key}" must be of type array')
            if not all(isinstance(s, str) for s in val):
                raise InternalError(f'option "{key}" must be of an array of strings')
            out[key] = val
        else:
            log.warning("invalid option provided: %s", key)
    return out


def sampling_of(opts: dict[str, Any]) -> Sampling:
    seed = opts.get("seed")
    return Sampling(
        seed=None if seed is None or seed == -1 else seed,
        num_predict=opts.get("num_predict", -1),
        stop=opts.get("stop", []),
        temperature=opts.get("temperature", 0.8),
    )


def think_flag(think: bool | str | None, thinking_capable: bool) -> bool:
    """None ⇒ on for thinking models (HEAD); "low"/"medium"/"high"/"max" ⇒ on."""
    if think is None:
        return thinking_capable
    if isinstance(think, str):
        return think.lower() not in ("", "false", "none")
    return think


def check_think(think: bool | str | None) -> None:
    if isinstance(think, str) and think.lower() not in ("low", "medium", "high", "max", "true", "false"):
        raise BadRequest(f'invalid think value: "{think}" (must be "high", "medium", "low", true, or false)')


def go_body(raw: bytes, struct: str, fields: Collection[str]) -> dict[str, Any]:
    """A request body as gin's ``ShouldBindJSON`` reads it into the Go struct ``struct``: ``null``
    leaves every field unset, another non-object is Go's type error, keys match ``fields``
    ignoring letter case; syntax errors in Go's words (`decode_object`)."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return decode_object(raw, fields)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"json: cannot unmarshal {go_kind(value)} into Go value of type {struct}")
    return fold_keys(value, fields) or value


def _fits(value: Any, gotype: str) -> bool:
    if isinstance(value, bool):
        return gotype == "bool"
    if gotype in ("int", "float64"):
        return isinstance(value, int) or (gotype == "float64" and isinstance(value, float))
    return isinstance(
        value, {"string": str, "bool": bool}.get(gotype) or (list if gotype[:2] == "[]" else dict)
    )


def check_fields(body: Mapping[str, Any], struct: str, spec: Mapping[str, str]) -> None:
    """Go's error for the first field of ``body`` whose JSON type ``spec``'s Go type cannot take."""
    for name, gotype in spec.items():
        value = body.get(name)
        if value is None or _fits(value, gotype):
            continue
        got = f"number {value}" if gotype == "int" and isinstance(value, float) else go_kind(value)
        raise BadRequest(
            f"json: cannot unmarshal {got} into Go struct field {struct}.{name} of type {gotype}"
        )
