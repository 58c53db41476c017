"""What the fleet's model rules make of a request: aliases, fallbacks and quantisation matches
(`candidates`, `quant_match`, `substitute`). The rules themselves (`Policy`, one KV record that
``corral alias``, ``corral fallback`` and ``corral pin`` write) and `PolicyStore`, every gateway's
live copy of it, are in `corral.runtime.policy`, which the registry reads for the pins.

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

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable
from typing import Final, Literal

import msgspec
from corral.gateway.access import model_allowed
from corral.protocol.errors import InvalidModelName
from corral.protocol.messages import AgentState
from corral.protocol.names import ModelName, parse_name
from corral.runtime.policy import Policy, policy_encoder
from corral.transport import WorkRequest

log = logging.getLogger(__name__)

MAX_FALLBACKS: Final = 8  # models one fallback list may name

Kind = Literal["alias", "fallback", "quant"]

# a quantisation as the last dash-separated part of a tag (``8b-instruct-q4_K_M``) or as the whole
# tag (``hf.co/user/repo:Q4_K_M``): llama.cpp's k-quants, i-quants and float types
_QUANT = re.compile(r"(?:i?q\d+(?:_[a-z0-9]+)*|f16|fp16|bf16|f32|fp32)", re.IGNORECASE)
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


def candidates(policy: Policy, requested: str, allowed: tuple[str, ...] = ()) -> list[Candidate]:
    """What to try for a request of model key ``requested``, in order: the model itself (or its
    alias's target), then its fallbacks (the alias's own list, else its target's) that an API key's
    allow-list ``allowed`` admits (`model_allowed`; empty: any). The name the client sent was
    checked against it, and an alias's target is what that name means; a fallback is another model."""
    target = policy.aliases.get(requested)
    first = Candidate(requested, None) if target is None else Candidate(target, "alias")
    out = [first]
    seen = {first.key}
    for key in policy.fallbacks.get(requested) or policy.fallbacks.get(first.key, ()):
        if key not in seen and model_allowed(allowed, key):
            seen.add(key)
            out.append(Candidate(key, "fallback"))
    return out


def split_quant(name: ModelName) -> tuple[str, str] | None:
    """``(tag without its quantisation, quantisation)`` of a model whose tag names one, else None."""
    head, _, last = name.tag.rpartition("-")
    if _QUANT.fullmatch(last):
        return head.lower(), last.lower()
    return None


def quant_match(requested: str, agents: Iterable[AgentState], allowed: tuple[str, ...] = ()) -> str | None:
    """A loaded model that is ``requested`` in another quantisation: same host, namespace and name,
    same tag but for its quantisation (parameter size and variant), and a quantisation level its
    agent reports, that an API key's allow-list ``allowed`` admits (empty: any). The one loaded on
    most agents wins (then the name, for a stable choice)."""
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
                if not model_allowed(allowed, have.key):
                    continue
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
def with_aliases(
    v1_models: bytes, policy: Policy, allowed: Callable[[str], bool], fleet: bytes | None = None
) -> bytes:
    """OpenAI's model list with each alias that ``allowed`` permits and whose target the fleet has
    (``fleet``: the whole fleet's list, when ``v1_models`` is an API key's narrower one: an alias
    the key may use serves its target, listed or not) added, owned by ``corral``."""
    if not policy.aliases:
        return v1_models
    body = _any.decode(v1_models)
    data = body.get("data") or []
    listed = {}
    for m in data if fleet is None else (_any.decode(fleet).get("data") or []):
        with contextlib.suppress(InvalidModelName, TypeError, KeyError):
            listed[model_key(m["id"])] = m
    for alias, target in sorted(policy.aliases.items()):
        served = listed.get(target)
        if served is not None and alias not in listed and allowed(alias):
            data.append({"id": alias, "object": "model", "created": served["created"], "owned_by": "corral"})
    body["data"] = data or None
    return policy_encoder.encode(body)


def v1_alias(policy: Policy, model_id: str, target_body: Callable[[str], bytes | None]) -> bytes | None:
    """``/v1/models/{model_id}`` of an alias that `with_aliases` lists: its target's entry
    (``target_body``, None when no agent has it) under the id asked for, owned by ``corral``;
    None for a name that is no alias."""
    try:
        target = policy.aliases.get(model_key(model_id))
    except InvalidModelName:
        return None
    served = None if target is None else target_body(target)
    if served is None:
        return None
    entry = _any.decode(served)
    return policy_encoder.encode({**entry, "id": model_id, "owned_by": "corral"})
