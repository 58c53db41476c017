"""Model aliases and fallbacks: the pure rules (which model serves a request, in what order, and
when), the quantisation match, the record `corral alias`/`corral fallback` write, and the planner's
use of them against a stand-in for routing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from corral import policyctl
from corral.auth.permissions import role_permissions
from corral.gateway.metrics import Decision, new_decision
from corral.gateway.planner import Planner
from corral.gateway.policy import (
    Candidate,
    candidates,
    quant_match,
    substitute,
    v1_alias,
    with_aliases,
)
from corral.gateway.settings import GatewaySettings
from corral.protocol.errors import BadRequest, CorralError, ModelNotFound, NoCapacity
from corral.protocol.messages import AgentState, ModelDetails, PsModel
from corral.protocol.subjects import Subjects
from corral.runtime.policy import Policy
from corral.transport import Reply, WorkRequest, model_work

RULES = Policy(
    aliases={"gpt-4o-mini:latest": "llama3.1:8b"},
    fallbacks={"llama3.1:70b": ("llama3.1:8b", "llama3.2:latest"), "llama3.1:8b": ("qwen3:8b",)},
)


def test_a_model_without_rules_is_served_by_itself_alone() -> None:
    assert candidates(RULES, "mistral:latest") == [Candidate("mistral:latest", None)]
    assert candidates(Policy(), "llama3.1:8b") == [Candidate("llama3.1:8b", None)]


def test_an_alias_is_served_by_its_target_then_the_targets_fallbacks() -> None:
    assert candidates(RULES, "gpt-4o-mini:latest") == [
        Candidate("llama3.1:8b", "alias"),
        Candidate("qwen3:8b", "fallback"),
    ]


def test_fallbacks_come_in_their_order_after_the_model_itself() -> None:
    assert candidates(RULES, "llama3.1:70b") == [
        Candidate("llama3.1:70b", None),
        Candidate("llama3.1:8b", "fallback"),
        Candidate("llama3.2:latest", "fallback"),
    ]


def test_an_aliass_own_fallbacks_win_and_no_model_is_tried_twice() -> None:
    rules = Policy(aliases={"a:latest": "m:latest"}, fallbacks={"a:latest": ("m:latest", "n:latest")})
    assert candidates(rules, "a:latest") == [
        Candidate("m:latest", "alias"),
        Candidate("n:latest", "fallback"),
    ]


def test_an_api_keys_allow_list_leaves_out_fallbacks_outside_it_not_an_aliass_target() -> None:
    """The name a key sent is checked against its allow-list; an alias's target is what that name
    means, but a fallback is another model, which the key may not reach through the rule."""
    assert candidates(RULES, "llama3.1:70b", ("llama3.1*",)) == [
        Candidate("llama3.1:70b", None),
        Candidate("llama3.1:8b", "fallback"),
    ]
    assert candidates(RULES, "gpt-4o-mini:latest", ("gpt-4o*",)) == [Candidate("llama3.1:8b", "alias")]
    assert candidates(RULES, "llama3.1:70b", ()) == candidates(RULES, "llama3.1:70b")  # no list: any


def _agent(agent_id: str, *loaded: tuple[str, str], status: str = "active") -> AgentState:
    return AgentState(
        id=agent_id,
        vendor="nvidia",
        host="h",
        ollama_url="http://h",
        status=status,  # type: ignore[arg-type]
        loaded=tuple(
            PsModel(
                name=name,
                model=name,
                size=1,
                digest="d",
                details=ModelDetails(family="llama", parameter_size="8.0B", quantization_level=q),
                expires_at="2030-01-01T00:00:00Z",
                size_vram=1,
            )
            for name, q in loaded
        ),
    )


Q4 = ("llama3.1:8b-instruct-q4_K_M", "Q4_K_M")


def test_a_quantisation_stands_in_for_another_of_the_same_model_size_and_variant() -> None:
    agents = [_agent("a", Q4)]
    # named as its agent spells it: that is what Ollama is asked for
    assert quant_match("llama3.1:8b-instruct-q8_0", agents) == "llama3.1:8b-instruct-q4_K_M"
    assert quant_match("llama3.1:8b-instruct-fp16", agents) == "llama3.1:8b-instruct-q4_K_M"


@pytest.mark.parametrize(
    "requested",
    [
        "llama3.1:70b-instruct-q8_0",  # another size
        "llama3.1:8b-text-q8_0",  # another variant
        "llama3.2:8b-instruct-q8_0",  # another model
        "library2/llama3.1:8b-instruct-q8_0",  # another namespace
        "llama3.1:8b-instruct-q4_K_M",  # the same quantisation: it is the model itself
        "llama3.1:8b",  # no quantisation in its name: nothing to compare
        "bad name!",
    ],
)
def test_no_quantisation_stands_in_for_another_model(requested: str) -> None:
    assert quant_match(requested, [_agent("a", Q4)]) is None


def test_only_loaded_models_of_active_agents_with_a_known_quantisation_stand_in() -> None:
    assert quant_match("llama3.1:8b-instruct-q8_0", [_agent("a", Q4, status="draining")]) is None
    assert (
        quant_match("llama3.1:8b-instruct-q8_0", [_agent("a", ("llama3.1:8b-instruct-q4_K_M", ""))]) is None
    )


def test_a_quantisation_outside_an_api_keys_allow_list_stands_in_for_nothing() -> None:
    agents = [_agent("a", Q4)]
    assert quant_match("llama3.1:8b-instruct-q8_0", agents, ("llama3.1:8b-instruct-q8*",)) is None
    assert quant_match("llama3.1:8b-instruct-q8_0", agents, ("llama3.1*",)) == Q4[0]


def test_the_quantisation_loaded_on_most_agents_wins() -> None:
    q5 = ("llama3.1:8b-instruct-q5_K_M", "Q5_K_M")
    agents = [_agent("a", Q4), _agent("b", q5), _agent("c", q5)]
    assert quant_match("llama3.1:8b-instruct-q8_0", agents) == "llama3.1:8b-instruct-q5_K_M"


def test_a_whole_tag_quantisation_matches_its_siblings() -> None:
    agents = [_agent("a", ("hf.co/user/repo:Q4_K_M", "Q4_K_M"))]
    assert quant_match("hf.co/user/repo:Q8_0", agents) == "hf.co/user/repo:Q4_K_M"


def test_a_substitute_names_the_served_model_in_its_body_and_drops_the_pin_echo() -> None:
    body = json.dumps({"model": "gpt-4o-mini@nvidia", "messages": [], "stream": False}).encode()
    work = model_work("/v1/chat/completions", body, "gpt-4o-mini@nvidia")
    assert work.echo_model == "gpt-4o-mini@nvidia"
    served = substitute(work, "llama3.2:latest")
    assert json.loads(served.body) == {"model": "llama3.2:latest", "messages": [], "stream": False}
    assert served.model is not None and served.model.key == "llama3.2:latest"
    assert served.echo_model is None and served.upstream_model is None
    assert served.vendor == "nvidia"
    assert work.model is not None and work.model.key == "gpt-4o-mini:latest"  # the original stays


def test_v1_models_lists_each_alias_whose_model_is_listed() -> None:
    listed = {
        "object": "list",
        "data": [{"id": "llama3.1:8b", "object": "model", "created": 7, "owned_by": "library"}],
    }
    rules = Policy(aliases={"gpt-4o-mini:latest": "llama3.1:8b", "gone:latest": "absent:latest"})
    out = json.loads(with_aliases(json.dumps(listed).encode(), rules, lambda _: True))
    assert [m["id"] for m in out["data"]] == ["llama3.1:8b", "gpt-4o-mini:latest"]
    assert out["data"][1] == {
        "id": "gpt-4o-mini:latest",
        "object": "model",
        "created": 7,
        "owned_by": "corral",
    }
    hidden = json.loads(
        with_aliases(json.dumps(listed).encode(), rules, lambda name: name != "gpt-4o-mini:latest")
    )
    assert [m["id"] for m in hidden["data"]] == ["llama3.1:8b"]


# -- the CLI's changes -------------------------------------------------------------------------------
def test_alias_changes() -> None:
    p = policyctl.set_alias("GPT-4o-mini", "llama3.1:8b")(Policy())
    assert p.aliases == {"gpt-4o-mini:latest": "llama3.1:8b"}
    assert policyctl.remove_alias("gpt-4o-mini")(p) == Policy()
    with pytest.raises(policyctl.PolicyError):
        policyctl.remove_alias("other")(p)
    with pytest.raises(policyctl.PolicyError):  # no chains: its target is an alias
        policyctl.set_alias("x", "gpt-4o-mini")(p)
    with pytest.raises(policyctl.PolicyError):  # no chains: it is another alias's model
        policyctl.set_alias("llama3.1:8b", "qwen3:8b")(p)
    with pytest.raises(policyctl.PolicyError):
        policyctl.set_alias("llama3.2", "llama3.2:latest")


def test_fallback_changes() -> None:
    p = policyctl.set_fallback("llama3.1:70b", ["llama3.1:8b", "llama3.2", "llama3.1:8b"])(Policy())
    assert p.fallbacks == {"llama3.1:70b": ("llama3.1:8b", "llama3.2:latest")}
    assert policyctl.remove_fallback("llama3.1:70b")(p) == Policy()
    for wrong in (["llama3.1:70b"], [], [f"m{i}" for i in range(9)]):
        with pytest.raises(policyctl.PolicyError):
            policyctl.set_fallback("llama3.1:70b", wrong)


def test_the_record_round_trips() -> None:
    encoded = msgspec.json.encode(RULES)
    assert msgspec.json.decode(encoded, type=Policy) == RULES


# -- the planner: which model it tries, for how long, and what it reports -------------------------------
class FakeReply:
    status = 200
    agent = "a1"  # the agent that answered (X-Corral-Model names the model as it lists it)


class PolicyView:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class Fleet:
    def __init__(self, *agents: AgentState) -> None:
        self._agents = list(agents)

    def agents(self) -> list[AgentState]:
        return self._agents

    def get(self, agent_id: str) -> AgentState | None:
        return next((a for a in self._agents if a.id == agent_id), None)


def planner(
    policy: Policy, outcomes: dict[str, Any], fleet: Fleet | None = None, **settings: Any
) -> tuple[Planner, list[tuple[str, float]]]:
    """A planner whose one-model routing (`_send`) answers from ``outcomes``: model key → an error
    to raise or a reply; each call is recorded with its time budget."""
    calls: list[tuple[str, float]] = []
    p = Planner.__new__(Planner)
    p.settings = GatewaySettings(queue_timeout_s=60.0, **settings)
    p.policy = PolicyView(policy)  # type: ignore[assignment]
    p.fleet = fleet or Fleet()  # type: ignore[assignment]

    async def send(req: WorkRequest, wait_s: float, decision: Decision) -> Reply:
        assert req.model is not None
        calls.append((req.model.key, wait_s))
        outcome = outcomes[req.model.key]
        if isinstance(outcome, CorralError):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    p._send = send  # type: ignore[method-assign]
    return p, calls


def chat(model: str) -> WorkRequest:
    return model_work("/api/chat", json.dumps({"model": model, "messages": []}).encode(), model)


async def test_a_model_that_starts_is_never_substituted() -> None:
    p, calls = planner(RULES, {"llama3.1:70b": FakeReply()}, fallback_after_s=5.0)
    d = new_decision()
    await p.send(chat("llama3.1:70b"), decision=d)
    assert [k for k, _ in calls] == ["llama3.1:70b"]
    assert calls[0][1] == 5.0  # it has fallbacks: it may take only fallback_after_s
    assert (d.served, d.substitution, d.requested) == ("llama3.1:70b", "", "")
    assert (b"x-corral-model", b"llama3.1:70b") in d.headers("a1")


async def test_a_model_without_fallbacks_may_take_the_whole_deadline() -> None:
    p, calls = planner(Policy(), {"mistral:latest": FakeReply()}, fallback_after_s=5.0)
    await p.send(chat("mistral"))
    assert [k for k, _ in calls] == ["mistral:latest"] and calls[0][1] > 59.0


async def test_an_absent_or_busy_model_goes_to_its_fallbacks_in_order() -> None:
    outcomes = {
        "llama3.1:70b": ModelNotFound("llama3.1:70b"),
        "llama3.1:8b": NoCapacity(),
        "llama3.2:latest": FakeReply(),
    }
    p, calls = planner(RULES, outcomes, fallback_after_s=5.0)
    d = new_decision()
    await p.send(chat("llama3.1:70b"), decision=d)
    assert [k for k, _ in calls] == ["llama3.1:70b", "llama3.1:8b", "llama3.2:latest"]
    assert calls[1][1] == 5.0 and 50.0 < calls[2][1] <= 60.0  # the last one: what is left of the deadline
    assert (d.served, d.substitution, d.requested) == ("llama3.2:latest", "fallback", "llama3.1:70b")


async def test_a_models_own_error_is_its_answer_and_when_all_fail_the_first_error_is() -> None:
    p, calls = planner(RULES, {"llama3.1:70b": BadRequest("no")})
    with pytest.raises(BadRequest):
        await p.send(chat("llama3.1:70b"))
    assert len(calls) == 1
    outcomes = {k: ModelNotFound(k) for k in ("llama3.1:70b", "llama3.1:8b", "llama3.2:latest")}
    p, calls = planner(RULES, outcomes)
    with pytest.raises(ModelNotFound, match="llama3.1:70b"):
        await p.send(chat("llama3.1:70b"))
    assert len(calls) == 3


async def test_an_alias_is_served_by_its_target() -> None:
    p, calls = planner(RULES, {"llama3.1:8b": FakeReply()})
    d = new_decision()
    await p.send(chat("gpt-4o-mini"), decision=d)
    assert [k for k, _ in calls] == ["llama3.1:8b"]
    assert (d.served, d.substitution, d.requested) == ("llama3.1:8b", "alias", "gpt-4o-mini:latest")


async def test_the_quantisation_fallback_is_opt_in_and_only_for_an_absent_model() -> None:
    fleet = Fleet(_agent("a", Q4))
    want = "llama3.1:8b-instruct-q8_0"
    outcomes: dict[str, Any] = {want: ModelNotFound(want), "llama3.1:8b-instruct-q4_k_m": FakeReply()}
    p, calls = planner(Policy(), outcomes, fleet)
    with pytest.raises(ModelNotFound):
        await p.send(chat(want))
    p, calls = planner(Policy(), outcomes, fleet, quant_fallback=True)
    d = new_decision()
    await p.send(chat(want), decision=d)
    assert [k for k, _ in calls] == [want, "llama3.1:8b-instruct-q4_k_m"]
    assert (d.served, d.substitution) == ("llama3.1:8b-instruct-q4_K_M", "quant")
    p, calls = planner(Policy(), {want: NoCapacity()}, fleet, quant_fallback=True)
    with pytest.raises(NoCapacity):  # present but busy: its own model or a configured fallback only
        await p.send(chat(want))
    assert len(calls) == 1


def test_the_quantisation_fallback_is_off_by_default() -> None:
    assert GatewaySettings().quant_fallback is False


def test_gateways_read_the_policy_bucket_and_only_the_operator_writes_it() -> None:
    s = Subjects("corral")
    write = s.kv_key(s.policy_bucket, ">")
    assert f"$JS.API.DIRECT.GET.KV_{s.policy_bucket}" in role_permissions("gateway", s).publish
    assert f"$JS.API.CONSUMER.CREATE.KV_{s.policy_bucket}" in role_permissions("gateway-g1", s).publish
    assert write in role_permissions("operator", s).publish
    for role in ("gateway", "gateway-g1", "registry", "aggregator", "agent-a1"):
        assert write not in role_permissions(role, s).publish, role


def test_an_alias_is_retrieved_as_its_targets_entry_only_when_the_target_is() -> None:
    rules = Policy(aliases={"gpt-4o-mini:latest": "llama3.2:latest"})
    entry = b'{"id":"llama3.2:latest","object":"model","created":7,"owned_by":"library"}'
    got = v1_alias(rules, "gpt-4o-mini", lambda target: entry if target == "llama3.2:latest" else None)
    assert json.loads(got or b"") == {
        "id": "gpt-4o-mini",
        "object": "model",
        "created": 7,
        "owned_by": "corral",
    }
    assert (
        v1_alias(rules, "gpt-4o-mini", lambda _: None) is None
    )  # no agent has it, or the key may not see it
    assert v1_alias(rules, "llama3.2", lambda _: entry) is None  # not an alias
    assert v1_alias(rules, "bad:name:", lambda _: entry) is None
