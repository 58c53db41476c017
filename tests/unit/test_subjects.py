"""Subjects, queue groups and JetStream names: all under one root, never overlapping another root."""

from __future__ import annotations

import re

import msgspec
import pytest
from corral.protocol.names import ANY_VENDOR, VENDORS, parse_name
from corral.protocol.subjects import (
    GATEWAY_ID_PATTERN,
    Subjects,
    check_gateway_id,
    is_sender,
    registry_sender,
)
from hypothesis import given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None)

TOKEN = parse_name("llama3.2").token  # llama3=2E2=3Alatest
# One NATS subject token: no separators, wildcards or whitespace.
SUBJECT_TOKEN = re.compile(r"[^.*>\s]+")
# JetStream stream and KV bucket names (ADR-6 / ADR-8).
JS_NAME = re.compile(r"[A-Za-z0-9_-]+")

roots = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


def concrete_subjects(s: Subjects) -> list[str]:
    return [
        s.work("nvidia", TOKEN),
        s.work(ANY_VENDOR, TOKEN),
        s.queue("amd", TOKEN),
        s.agent_work("gpu-box-1_11434"),
        s.agent_ctl("gpu-box-1_11434"),
        s.reply("gw1", "req42"),
        s.body("gw1", "req42"),
        s.event("agent"),
        s.registry("place"),
        s.agg("tags"),
    ]


def wildcard_subjects(s: Subjects) -> list[str]:
    return [s.reply_all("gw1"), s.body_all("gw1"), s.events_all()]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a trailing ``>`` one or more."""
    pt, st_ = pattern.split("."), subject.split(".")
    for i, p in enumerate(pt):
        if p == ">":
            return len(st_) > i
        if i >= len(st_) or (p != "*" and p != st_[i]):
            return False
    return len(pt) == len(st_)


def test_matcher_sanity() -> None:
    assert matches("a.*.c", "a.b.c")
    assert matches("a.>", "a.b.c")
    assert not matches("a.>", "a")
    assert not matches("a.*", "a.b.c")
    assert not matches("a.b", "a.bb")


# -- exact shapes ------------------------------------------------------------------------------


def test_default_root_and_exact_subjects() -> None:
    s = Subjects()
    assert s.root == "corral"
    assert s.work("nvidia", TOKEN) == "corral.work.nvidia.llama3=2E2=3Alatest"
    assert s.queue("amd", TOKEN) == "corral.queue.amd.llama3=2E2=3Alatest"
    assert s.agent_work("a1") == "corral.agent.a1.work"
    assert s.agent_ctl("a1") == "corral.agent.a1.ctl"
    assert s.reply("g", "r") == "corral.reply.g.r"
    assert s.reply_all("g") == "corral.reply.g.*"
    assert s.body("g", "r") == "corral.body.g.r"
    assert s.body_all("g") == "corral.body.g.*"
    assert s.event("agent") == "corral.events.agent"
    assert s.events_all() == "corral.events.>"
    assert s.registry("place") == "corral.registry.place"
    assert s.agg("tags") == "corral.agg.tags"


@pytest.mark.parametrize("root", ["corral", "t0a1b2c3", "fleet-2", "A_b"])
def test_every_subject_is_under_the_root(root: str) -> None:
    s = Subjects(root)
    for subject in concrete_subjects(s) + wildcard_subjects(s):
        tokens = subject.split(".")
        assert tokens[0] == root
        assert all(tokens), subject  # no empty tokens
    for subject in concrete_subjects(s):
        assert all(SUBJECT_TOKEN.fullmatch(t) for t in subject.split(".")), subject


def test_wildcards_cover_their_concrete_subjects() -> None:
    s = Subjects("r")
    assert matches(s.reply_all("gw1"), s.reply("gw1", "req42"))
    assert matches(s.body_all("gw1"), s.body("gw1", "req42"))
    assert matches(s.events_all(), s.event("agent"))
    assert not matches(s.reply_all("gw2"), s.reply("gw1", "req42"))
    assert not matches(s.reply_all("gw1"), s.body("gw1", "req42"))


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("root", ["", "a.b", "a b", "a*", ">", "$SYS", "a/b", "é", "a\n"])
def test_invalid_root_is_rejected(root: str) -> None:
    with pytest.raises(ValueError):
        Subjects(root)


def test_invalid_root_is_rejected_when_decoded() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"root": "a.b"}, Subjects)


@pytest.mark.parametrize("vendor", [*VENDORS, ANY_VENDOR])
def test_work_accepts_every_vendor(vendor: str) -> None:
    assert Subjects("r").work(vendor, TOKEN).split(".") == ["r", "work", vendor, TOKEN]


@pytest.mark.parametrize("vendor", ["", "NVIDIA", "cuda", "nvidia.amd", "*", ">"])
def test_work_rejects_unknown_vendor(vendor: str) -> None:
    with pytest.raises(ValueError):
        Subjects("r").work(vendor, TOKEN)


NON_TOKENS = ["", "llama3.2:latest", "a.b", "*", ">", "a b", "Llama3", "x=3a"]


@pytest.mark.parametrize("model", NON_TOKENS)
def test_work_rejects_non_token_model(model: str) -> None:
    with pytest.raises(ValueError):
        Subjects("r").work("nvidia", model)


@pytest.mark.parametrize("vendor", ["", "cuda", "nvidia.amd", "*"])
def test_queue_rejects_unknown_vendor(vendor: str) -> None:
    with pytest.raises(ValueError):
        Subjects("r").queue(vendor, TOKEN)


@pytest.mark.parametrize("model", NON_TOKENS)
def test_queue_rejects_non_token_model(model: str) -> None:
    with pytest.raises(ValueError):
        Subjects("r").queue("nvidia", model)


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "a/b"])
def test_id_tokens_are_validated(bad: str) -> None:
    s = Subjects("r")
    builders = [
        lambda: s.agent_work(bad),
        lambda: s.agent_ctl(bad),
        lambda: s.reply(bad, "req"),
        lambda: s.reply("gw", bad),
        lambda: s.reply_all(bad),
        lambda: s.body(bad, "req"),
        lambda: s.body("gw", bad),
        lambda: s.body_all(bad),
        lambda: s.event(bad),
        lambda: s.registry(bad),
        lambda: s.agg(bad),
    ]
    for build in builders:
        with pytest.raises(ValueError):
            build()


def test_a_registry_copys_replies_are_under_the_registrys_token_and_no_gateways() -> None:
    """Each registry copy names itself ``registry.<copy>``: one wildcard covers every copy's replies
    and bodies, and no gateway's, since no gateway may be called ``registry``."""
    s = Subjects("r")
    sender = registry_sender("ab12")
    assert sender == "registry.ab12" and is_sender(sender) and is_sender("gw1")
    assert s.reply(sender, "req") == "r.reply.registry.ab12.req"
    for subject in (s.reply(sender, "req"), s.reply_all(sender).replace("*", "x")):
        assert matches(s.registry_replies, subject)
    assert matches(s.registry_bodies, s.body(sender, "req"))
    for gateway in ("gw1", "registry2", "registry_", "Registry"):
        assert not matches(s.registry_replies, s.reply(gateway, "req"))
        assert check_gateway_id(gateway) == gateway and re.fullmatch(GATEWAY_ID_PATTERN, gateway)
    for bad in ("registry", "x" * 65, "a.b"):
        assert not re.fullmatch(GATEWAY_ID_PATTERN, bad)
        with pytest.raises(ValueError):
            check_gateway_id(bad)
    for bad in ("other.ab12", "registry.", "registry.a.b", "registry.*"):
        assert not is_sender(bad)
        with pytest.raises(ValueError):
            s.reply(bad, "req")


# -- queue groups ------------------------------------------------------------------------------


def test_claim_queue_group_is_the_claim_subject() -> None:
    s = Subjects("r")
    for vendor in (*VENDORS, ANY_VENDOR):
        assert s.work_queue_group(vendor, TOKEN) == s.work(vendor, TOKEN)
    # Different models and vendors never share a group; instances of one kind always do.
    other = parse_name("mistral").token
    groups = {s.work_queue_group(v, t) for v in ("nvidia", "amd") for t in (TOKEN, other)}
    assert len(groups) == 4
    assert Subjects("r").work_queue_group("nvidia", TOKEN) == s.work_queue_group("nvidia", TOKEN)


def test_service_queue_groups_are_fixed_names() -> None:
    assert Subjects("a").registry_queue_group == Subjects("b").registry_queue_group == "registry"
    assert Subjects("a").aggregator_queue_group == Subjects("b").aggregator_queue_group == "aggregator"


def test_claim_queue_group_validates_like_work() -> None:
    with pytest.raises(ValueError):
        Subjects("r").work_queue_group("cuda", TOKEN)
    with pytest.raises(ValueError):
        Subjects("r").work_queue_group("nvidia", "a.b")


# -- JetStream names ---------------------------------------------------------------------------


def test_bucket_and_stream_names_for_the_default_root() -> None:
    s = Subjects()
    assert s.agents_bucket == "corral_agents"
    assert s.models_bucket == "corral_models"
    assert s.sessions_bucket == "corral_sessions"
    assert s.views_bucket == "corral_views"
    assert s.queue_stream == "corral_queue"


def js_names(s: Subjects) -> list[str]:
    return [s.agents_bucket, s.models_bucket, s.sessions_bucket, s.views_bucket, s.queue_stream]


@PROPERTY
@given(roots)
def test_jetstream_names_are_valid_and_distinct(root: str) -> None:
    names = js_names(Subjects(root))
    assert all(JS_NAME.fullmatch(n) for n in names)
    assert len(set(names)) == len(names)
    assert Subjects(root).agents_bucket.startswith(root)


# -- two roots never overlap -------------------------------------------------------------------


@PROPERTY
@given(roots, roots)
def test_subjects_of_one_root_never_match_another_roots_wildcards(a: str, b: str) -> None:
    if a == b:
        return
    sa, sb = Subjects(a), Subjects(b)
    for pattern in wildcard_subjects(sb):
        for subject in concrete_subjects(sa):
            assert not matches(pattern, subject), (pattern, subject)
    assert not set(concrete_subjects(sa)) & set(concrete_subjects(sb))


@PROPERTY
@given(roots, roots)
def test_distinct_roots_have_disjoint_kv_buckets(a: str, b: str) -> None:
    if a == b:
        return
    sa, sb = Subjects(a), Subjects(b)
    buckets_a = {sa.agents_bucket, sa.models_bucket, sa.sessions_bucket, sa.views_bucket}
    buckets_b = {sb.agents_bucket, sb.models_bucket, sb.sessions_bucket, sb.views_bucket}
    assert not buckets_a & buckets_b


@pytest.mark.parametrize(("a", "b"), [("a", "b"), ("corral", "corral2"), ("corral", "Corral"), ("a", "A")])
def test_distinct_roots_have_distinct_queue_streams(a: str, b: str) -> None:
    # Subjects and stream names are case-sensitive; roots differing only in case are two fleets.
    assert Subjects(a).queue_stream != Subjects(b).queue_stream
