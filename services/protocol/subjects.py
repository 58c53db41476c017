"""Every NATS subject, queue group and KV bucket name Corral uses, built under one root.

Subjects run general → specific so wildcards subscribe naturally (NATS naming rules:
https://github.com/nats-io/nats-architecture-and-design/blob/main/adr/ADR-6.md)::

    {root}.work.{vendor}.{model}     warm claims; queue group = the subject
    {root}.work.batch.{vendor}.{model}   the same for batch-priority work (spare slots only)
    {root}.queue.{vendor}.{model}    overflow (JetStream work-queue stream)
    {root}.queue.batch.{vendor}.{model}  its batch lane, taken after the interactive one
    {root}.queued.{vendor}.{model}   core-NATS nudge after each enqueue (empty payload)
    {root}.agent.{id}.work           direct work for one agent (affinity, pins, cold loads)
    {root}.agent.{id}.ctl            cancel a request on one agent (whoever sent it)
    {root}.agent.{id}.admin          drain / cordon / uncordon one agent (the operator)
    {root}.reply.{sender}.{req}      the reply stream of one request
    {root}.body.{sender}.{req}       an agent fetches a request body above the payload limit
    {root}.events.{kind}             agent joined/left/dead, request finished, ...
    {root}.registry.{op}             registry request API (queue group "registry")
    {root}.agg.{op}                  aggregator request API (queue group "aggregator")
    {root}.batchline.{batch}         the lines of one batch (JetStream work-queue stream)

``{vendor}`` is one of ``nvidia amd intel apple cpu any``; ``{model}`` is `ModelName.token`.
``{sender}`` is the requester's token: a gateway's id (or a client's), or ``registry.{copy}`` for a
registry copy, so that NATS permissions can give the registry identity the replies to its own
requests (``{root}.reply.registry.>``) and no one else's (`registry_sender`).
"""

from __future__ import annotations

import functools
import re
from typing import TypeGuard

import msgspec
from corral.protocol.names import ANY_VENDOR, VENDORS, is_token
from corral.protocol.priority import BATCH, INTERACTIVE, Priority

_ROOT = re.compile(r"[A-Za-z0-9_-]+")
# a reply subject a peer may name: printable ASCII, no spaces, no wildcards (``*`` ``>``)
_REPLY = re.compile(r"[!-)+-=?-~]{1,255}")
_ID_CHARS = "[A-Za-z0-9_-]"
_ID = re.compile(f"{_ID_CHARS}+")
REGISTRY_SENDER = "registry"  # the sender the registry's replies name (`Subjects.registry_ctl`)
# a requester's token in reply and body subjects: an id of at most 64, or a registry copy's two tokens
_SENDER = re.compile(f"(?:{REGISTRY_SENDER}\\.)?{_ID_CHARS}{{1,64}}")
# an agent id: a subject token, and not the registry's (empty: the agent makes its own)
AGENT_ID_PATTERN = f"^(?!{REGISTRY_SENDER}$){_ID_CHARS}*$"
# a gateway id: a subject token of at most 64, and not the registry's (its replies are the registry's)
GATEWAY_ID_PATTERN = f"^(?!{REGISTRY_SENDER}$){_ID_CHARS}{{0,64}}$"


@functools.lru_cache(maxsize=4096)
def _work(root: str, vendor: str, model_token: str) -> str:
    """A claim subject, validated once per (root, vendor, model): built on every request."""
    if vendor not in VENDORS and vendor != ANY_VENDOR:
        raise ValueError(f"unknown vendor {vendor!r}")
    if not is_token(model_token):
        raise ValueError(f"not a model token: {model_token!r}")
    return f"{root}.work.{vendor}.{model_token}"


def _lane(subject: str, kind: str) -> str:
    """``subject``'s batch lane: ``batch`` after its kind (``.work.`` or ``.queue.``)."""
    return subject.replace(kind, f"{kind}{BATCH}.", 1)


def _check_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(f"not a valid subject token: {value!r}")
    return value


def _check_sender(value: str) -> str:
    if not _SENDER.fullmatch(value):
        raise ValueError(f"not a valid sender: {value!r}")
    return value


def is_sender(value: str) -> bool:
    """Whether ``value`` may name a requester in reply and body subjects (`registry_sender`)."""
    return _SENDER.fullmatch(value) is not None


def registry_sender(copy: str) -> str:
    """The token of registry copy ``copy`` in its reply and body subjects: under the registry's
    own (``registry.{copy}``), which no gateway id can be (`GATEWAY_ID_PATTERN`)."""
    return f"{REGISTRY_SENDER}.{_check_id(copy)}"


def check_gateway_id(value: str) -> str:
    """``value`` if a gateway may be named so (`GATEWAY_ID_PATTERN`); else `ValueError`."""
    if value == REGISTRY_SENDER:
        raise ValueError(f"{value!r} is the registry's token in reply subjects, not a gateway's")
    if len(value) > 64:
        raise ValueError(f"a gateway id has at most 64 characters: {value[:80]!r}")
    return _check_id(value)


def check_agent_id(value: str) -> str:
    """``value`` if an agent may be named so (`AGENT_ID_PATTERN`): a subject token other than the
    sender the registry's own control subject uses; else `ValueError`."""
    if value == REGISTRY_SENDER:
        raise ValueError(f"{value!r} names the registry's own control subject, not an agent")
    return _check_id(value)


class Subjects(msgspec.Struct, frozen=True):
    root: str = "corral"

    def __post_init__(self) -> None:
        if not _ROOT.fullmatch(self.root):
            raise ValueError(f"subject root must match [A-Za-z0-9_-]+, got {self.root!r}")

    # -- request path ------------------------------------------------------------------------
    @property
    def work_template(self) -> str:
        """Low-cardinality name of the claim subjects (span names, metrics)."""
        return f"{self.root}.work.{{vendor}}.{{model}}"

    @property
    def agent_work_template(self) -> str:
        return f"{self.root}.agent.{{id}}.work"

    @property
    def queue_template(self) -> str:
        """Low-cardinality name of the fleet queue's subjects (span names)."""
        return f"{self.root}.queue.{{vendor}}.{{model}}"

    def work(self, vendor: str, model_token: str, priority: Priority = INTERACTIVE) -> str:
        """The claim subject of ``model_token`` for ``vendor`` (or any); batch work has its own
        (``{root}.work.batch.{vendor}.{model}``), armed by agents only for slots they can spare."""
        subject = _work(self.root, vendor, model_token)
        return subject if priority == INTERACTIVE else _lane(subject, ".work.")

    def work_queue_group(self, vendor: str, model_token: str) -> str:
        """One queue group per claim subject: every agent that may claim shares it."""
        return self.work(vendor, model_token)

    def queue(self, vendor: str, model_token: str, priority: Priority = INTERACTIVE) -> str:
        """The fleet queue's lane for ``model_token``: ``{root}.queue.{vendor}.{model}``, and for
        batch work ``{root}.queue.batch.{vendor}.{model}`` (agents take it after the first). The
        model token is the last token of both."""
        self.work(vendor, model_token)  # same validation as the claim subject
        subject = f"{self.root}.queue.{vendor}.{model_token}"
        return subject if priority == INTERACTIVE else _lane(subject, ".queue.")

    @property
    def queue_all(self) -> str:
        return f"{self.root}.queue.>"

    def queued(self, vendor: str, model_token: str) -> str:
        """The nudge published after a request joins ``queue(vendor, model)``."""
        self.work(vendor, model_token)
        return f"{self.root}.queued.{vendor}.{model_token}"

    def agent_work(self, agent_id: str) -> str:
        return f"{self.root}.agent.{_check_id(agent_id)}.work"

    def agent_ctl(self, agent_id: str) -> str:
        """Cancel of one request: a sender of work may publish here."""
        return f"{self.root}.agent.{_check_id(agent_id)}.ctl"

    @property
    def registry_ctl(self) -> str:
        """Cancels of the registry's fleet-wide pulls: their replies name `REGISTRY_SENDER` as the
        sender, and a sender of work cancels on the sender's `agent_ctl`."""
        return self.agent_ctl(REGISTRY_SENDER)

    def agent_admin(self, agent_id: str) -> str:
        """Drain, cordon, uncordon: apart from `agent_ctl`, so that NATS permissions can let a
        gateway cancel its requests without letting it take agents out of the fleet."""
        return f"{self.root}.agent.{_check_id(agent_id)}.admin"

    def agent_all(self, kind: str) -> str:
        """``agent_work``, ``agent_ctl`` or ``agent_admin`` of every agent (``kind``: the last token)."""
        return f"{self.root}.agent.*.{_check_id(kind)}"

    def reply(self, sender: str, request_id: str) -> str:
        return f"{self.root}.reply.{_check_sender(sender)}.{_check_id(request_id)}"

    def is_reply(self, subject: str | None) -> TypeGuard[str]:
        """Whether ``subject`` is a usable reply subject of this root (``{root}.reply.…``): the only
        subjects a work request may be answered on, so a request cannot aim an agent's answer at
        another subject its sender could not publish to itself."""
        return usable_reply(subject) and subject.startswith(f"{self.root}.reply.")

    def reply_all(self, sender: str) -> str:
        return f"{self.root}.reply.{_check_sender(sender)}.*"

    def body(self, sender: str, request_id: str) -> str:
        return f"{self.root}.body.{_check_sender(sender)}.{_check_id(request_id)}"

    def body_all(self, sender: str) -> str:
        return f"{self.root}.body.{_check_sender(sender)}.*"

    @property
    def registry_replies(self) -> str:
        """The replies to every registry copy's requests (`registry_sender`), and no one else's."""
        return f"{self.root}.reply.{REGISTRY_SENDER}.>"

    @property
    def registry_bodies(self) -> str:
        return f"{self.root}.body.{REGISTRY_SENDER}.>"

    # -- cluster -----------------------------------------------------------------------------
    def event(self, kind: str) -> str:
        return f"{self.root}.events.{_check_id(kind)}"

    @property
    def work_all(self) -> str:
        return f"{self.root}.work.>"

    @property
    def queued_all(self) -> str:
        return f"{self.root}.queued.>"

    @property
    def replies_all(self) -> str:
        """Every reply subject, of every sender."""
        return f"{self.root}.reply.>"

    @property
    def bodies_all(self) -> str:
        return f"{self.root}.body.>"

    def events_all(self) -> str:
        return f"{self.root}.events.>"

    def registry(self, op: str) -> str:
        return f"{self.root}.registry.{_check_id(op)}"

    registry_queue_group = "registry"
    aggregator_queue_group = "aggregator"

    def agg(self, op: str) -> str:
        return f"{self.root}.agg.{_check_id(op)}"

    # -- JetStream ---------------------------------------------------------------------------
    @property
    def agents_bucket(self) -> str:
        return f"{self.root}_agents"

    @property
    def models_bucket(self) -> str:
        return f"{self.root}_models"

    @property
    def sessions_bucket(self) -> str:
        return f"{self.root}_sessions"

    @property
    def views_bucket(self) -> str:
        return f"{self.root}_views"

    @property
    def policy_bucket(self) -> str:
        """The fleet's model aliases and fallbacks (``corral alias``, ``corral fallback``)."""
        return f"{self.root}_policy"

    @property
    def keys_bucket(self) -> str:
        """The gateway's API keys (hashes only), one entry per key name."""
        return f"{self.root}_keys"

    @property
    def usage_bucket(self) -> str:
        """Usage per API key, model and hour or day."""
        return f"{self.root}_usage"

    @property
    def limits_bucket(self) -> str:
        """Each API key's requests and tokens in the current minute, shared by the gateways."""
        return f"{self.root}_limits"

    @property
    def queue_stream(self) -> str:
        return f"{self.root}_queue"

    # -- the Batch API (``corral.gateway.batch``) --------------------------------------------
    @property
    def files_store(self) -> str:
        """The object store of uploaded files and batch output files (``/v1/files``)."""
        return f"{self.root}_files"

    @property
    def batches_bucket(self) -> str:
        """One record per batch (``/v1/batches``), updated by compare-and-set only."""
        return f"{self.root}_batches"

    @property
    def batch_results_bucket(self) -> str:
        """Each batch line's result, keyed ``{batch}.{line index}``, until its batch is finished."""
        return f"{self.root}_batchresults"

    @property
    def batch_lines_stream(self) -> str:
        """The work-queue stream of batch lines waiting to run, one subject per batch."""
        return f"{self.root}_batchlines"

    def batch_line(self, batch_id: str) -> str:
        return f"{self.root}.batchline.{_check_id(batch_id)}"

    @property
    def batch_lines_all(self) -> str:
        return f"{self.root}.batchline.>"

    batch_consumer = "batch-runner"  # the one durable consumer every gateway's runner shares

    @staticmethod
    def object_stream(store: str) -> str:
        """The JetStream stream that holds an object store."""
        return f"OBJ_{store}"

    @staticmethod
    def object_subjects(store: str) -> str:
        """Every subject of an object store: its chunks and its metadata."""
        return f"$O.{store}.>"

    @property
    def buckets(self) -> tuple[str, ...]:
        return (
            self.agents_bucket,
            self.models_bucket,
            self.sessions_bucket,
            self.views_bucket,
            self.policy_bucket,
        )

    @staticmethod
    def kv_key(bucket: str, key: str) -> str:
        """The subject a KV put, create, update or delete of ``key`` publishes on (``>``: every key)."""
        return f"$KV.{bucket}.{key}"

    @staticmethod
    def kv_stream(bucket: str) -> str:
        """The JetStream stream that holds a KV bucket."""
        return f"KV_{bucket}"


def usable_reply(subject: str | None) -> TypeGuard[str]:
    """Whether a reply may be sent on ``subject`` (a reply-to, or a ``Corral-Reply`` header):
    printable ASCII, no spaces, no wildcards, and not a system subject (``$KV.…``, ``$JS.…``): a
    reply there would be a KV write or a JetStream call made on a stranger's behalf."""
    return subject is not None and _REPLY.fullmatch(subject) is not None and not subject.startswith("$")
