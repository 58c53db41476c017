"""Model aliases, fallbacks and pins: the rules (`Policy`, one KV record that ``corral alias``,
``corral fallback`` and ``corral pin`` write), what they make of a request (`candidates`, `quant_match`, `substitute`),
and `PolicyStore`, every gateway's live copy of the record.

- an **alias** serves a name no model has (``gpt-4o-mini``) with a model the fleet has
  (``llama3.1:8b``); it is followed once, never in a chain;
- a **fallback** serves a model that cannot start within its deadline — no agent has it, or every
  replica stayed busy — with the next model of its list that can;
- the **quantisation fallback** (``CORRAL_QUANT_FALLBACK``, off by default) serves a model no agent
  has with a loaded model of the same name, parameter size and variant in another quantisation
  (``llama3.1:8b-instruct-q8_0`` by a loaded ``llama3.1:8b-instruct-q4_K_M``).

Never silently: the reply's ``model`` field and its ``X-Corral-Model`` header name the model that
served, and ``corral_gateway_model_substitutions_total`` counts each substitution.

A **pin** keeps a model loaded on N agents; the registry acts on it (`corral.registry.pins`), the
gateway only shows it in ``/api/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from typing import Final, Literal

import msgspec
import nats.errors
from corral.protocol.errors import InvalidModelName
from corral.protocol.messages import AgentState
from corral.protocol.names import ModelName, parse_name
from corral.runtime.nats import watch_forever
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.transport import WorkRequest
from corral.views.status import Pin
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

POLICY_KEY: Final = "rules"  # the one record in the policy bucket
MAX_FALLBACKS: Final = 8  # models one fallback list may name

Kind = Literal["alias", "fallback", "quant"]

# a quantisation as the last dash-separated part of a tag (``8b-instruct-q4_K_M``) or as the whole
# tag (``hf.co/user/repo:Q4_K_M``): llama.cpp's k-quants, i-quants and float types
_QUANT = re.compile(r"(?:i?q\d+(?:_[a-z0-9]+)*|f16|fp16|bf16|f32|fp32)", re.IGNORECASE)


class Policy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The fleet's rules, by normalised model key (``llama3.2:latest``): alias → the model that
    serves it; model → the models that serve it, in order, when it cannot start in time; model →
    how many agents keep it loaded."""

    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    fallbacks: dict[str, tuple[str, ...]] = msgspec.field(default_factory=dict)
    pins: dict[str, Pin] = msgspec.field(default_factory=dict)


policy_decoder = msgspec.json.Decoder(Policy)
policy_encoder = msgspec.json.Encoder()
_any = msgspec.json.Decoder()


def model_key(name: str) -> str:
    """The normalised key of a model name; `InvalidModelName` for one Ollama would refuse."""
    return parse_name(name).key


# -- the rules --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Candidate:
    """A model to try for a request, and why: None for the model it names itself."""

    key: str
    kind: Kind | None


def candidates(policy: Policy, requested: str) -> list[Candidate]:
    """What to try for a request of model key ``requested``, in order: the model itself (or its
    alias's target), then its fallbacks (the alias's own list, else its target's)."""
    target = policy.aliases.get(requested)
    first = Candidate(requested, None) if target is None else Candidate(target, "alias")
    out = [first]
    seen = {first.key}
    for key in policy.fallbacks.get(requested) or policy.fallbacks.get(first.key, ()):
        if key not in seen:
            seen.add(key)
            out.append(Candidate(key, "fallback"))
    return out


def falls_back(status: int) -> bool:
    """Whether a model that failed with this status may be served by its fallbacks: not found
    (404) or no capacity within its deadline (503); any other error is the model's own answer."""
    return status in (404, 503)


def split_quant(name: ModelName) -> tuple[str, str] | None:
    """``(tag without its quantisation, quantisation)`` of a model whose tag names one, else None."""
    head, _, last = name.tag.rpartition("-")
    if _QUANT.fullmatch(last):
        return head.lower(), last.lower()
    return None


def quant_match(requested: str, agents: Iterable[AgentState]) -> str | None:
    """A loaded model that is ``requested`` in another quantisation: same host, namespace and name,
    same tag but for its quantisation (parameter size and variant), and a quantisation level its
    agent reports. The one loaded on most agents wins (then the name, for a stable choice)."""
    try:
        want = parse_name(requested)
    except InvalidModelName:
        return None
    wanted = split_quant(want)
    if wanted is None:
        return None
    counts: dict[str, int] = {}
    names: dict[str, str] = {}  # key → the name as its agent spells it (what Ollama is asked for)
    for agent in agents:
        if agent.status != "active":
            continue
        for m in agent.loaded:
            if not m.details.quantization_level:
                continue
            try:
                have = parse_name(m.name)
            except InvalidModelName:
                continue
            got = split_quant(have)
            if (
                got is not None
                and got[0] == wanted[0]
                and got[1] != wanted[1]
                and (have.host.lower(), have.namespace.lower(), have.model.lower())
                == (want.host.lower(), want.namespace.lower(), want.model.lower())
            ):
                counts[have.key] = counts.get(have.key, 0) + 1
                names.setdefault(have.key, have.display)
    if not counts:
        return None
    return names[min(counts, key=lambda k: (-counts[k], k))]


def substitute(work: WorkRequest, served: str) -> WorkRequest:
    """``work`` for model ``served`` instead: the body names it, so Ollama's reply does too
    (a stripped vendor pin is not restored: the reply names the model that served)."""
    obj = _any.decode(work.body)
    obj["model"] = served
    return dataclasses.replace(
        work,
        body=policy_encoder.encode(obj),
        model=parse_name(served),
        echo_model=None,
        upstream_model=None,
    )


# -- /v1/models ---------------------------------------------------------------------------------------
def with_aliases(v1_models: bytes, policy: Policy, allowed: Callable[[str], bool]) -> bytes:
    """OpenAI's model list with each alias whose target it lists (and ``allowed`` permits) added,
    owned by ``corral``."""
    if not policy.aliases:
        return v1_models
    body = _any.decode(v1_models)
    data = body.get("data") or []
    listed = {}
    for m in data:
        with contextlib.suppress(InvalidModelName, TypeError, KeyError):
            listed[model_key(m["id"])] = m
    for alias, target in sorted(policy.aliases.items()):
        served = listed.get(target)
        if served is not None and alias not in listed and allowed(alias):
            data.append({"id": alias, "object": "model", "created": served["created"], "owned_by": "corral"})
    body["data"] = data or None
    return policy_encoder.encode(body)


# -- every gateway's copy -----------------------------------------------------------------------------
class PolicyStore:
    """The policy bucket's record, kept by a KV watch (`watch_once`, under
    `corral.runtime.nats.watch_forever`): a change made anywhere reaches every gateway as a KV event."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.policy = Policy()
        self.loaded = asyncio.Event()  # the first value (or its absence) is in
        self._changed = asyncio.Event()
        self._restart = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the watch; returns once the rules are loaded."""
        self._task = asyncio.create_task(
            supervise("policy watch", lambda: watch_forever(self.watch_once, self._restart)),
            name="policy-watch",
        )
        async with asyncio.timeout(timeout):
            await self.loaded.wait()

    def restart(self) -> None:
        """Watch the bucket again (it was opened again after a reconnect)."""
        self._restart.set()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def wait_for(self, predicate: Callable[[Policy], bool], timeout: float) -> Policy:
        """Wait until the rules satisfy ``predicate`` (woken by each KV event; tests)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.policy):
                self._changed.clear()
                await self._changed.wait()
        return self.policy

    async def watch_once(self) -> None:
        watcher = await self.kv.watch(POLICY_KEY)
        try:
            async for entry in watcher:
                if entry is None:  # the initial value is in (None when there is none)
                    self.loaded.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.policy = Policy()
                else:
                    try:
                        self.policy = policy_decoder.decode(entry.value)
                    except msgspec.DecodeError:
                        log.warning("ignoring an undecodable policy record; the rules stay as they were")
                        continue
                log.info(
                    "model policy: %d aliases, %d fallback lists, %d pins",
                    len(self.policy.aliases),
                    len(self.policy.fallbacks),
                    len(self.policy.pins),
                )
                self._changed.set()
        finally:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing under us
                await watcher.stop()  # type: ignore[no-untyped-call]
