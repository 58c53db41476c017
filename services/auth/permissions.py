"""What each role may publish and subscribe to, built from the subjects of one root.

Roles, and why each right is there (``R`` is the root; JetStream API subjects are NATS's own,
https://docs.nats.io/nats-concepts/jetstream/js_api_reference):

- every role opens the four KV buckets and the queue stream (``STREAM.INFO``), reads and watches
  the buckets (direct gets, ordered consumers and their flow control) and receives the answers to
  its own requests on its own inbox prefix only (``_INBOX_<user>.>``: nobody reads another's);
  ``allow_responses`` lets it answer requests it received (one message each) on their reply subject.
- gateway: sends work (``R.work.>``, ``R.agent.*.work``), cancels it (``R.agent.*.ctl``), queues it
  (``R.queue.>`` + the nudge ``R.queued.>``, withdraws by ``STREAM.MSG.DELETE`` and sees whether
  an agent took it by ``STREAM.MSG.GET``), asks the registry
  (``place``, ``unplace``, ``pull``), remembers sessions (``$KV.R_sessions.>``), reads the API keys
  and counts their usage and limits (``R_keys``; ``$KV.R_usage.>``, ``$KV.R_limits.>``); reads its
  replies and serves large bodies: its own (``R.reply.<id>.*``, ``R.body.<id>.*``) as ``gateway-<id>``
  with a fixed ``--gateway-id``, every gateway's (``R.reply.>``, ``R.body.>``) as the shared ``gateway``.
  Its Batch API runner (`corral.gateway.batch`) keeps the fleet's batches in stores no other service
  touches; the operator's setup makes them (a stream's maker sets its subjects: a gateway that could
  make or change one could have it capture other gateways' replies or every request): it writes files (``$O.R_files.>``, purging an object's old chunks), batch records and results
  (``$KV.R_batches.>``, ``$KV.R_batchresults.>``, purging a finished batch's results), queues lines
  (``R.batchline.>``) and takes them from their one durable consumer (``MSG.NEXT``, acks).
- agent ``<id>``: takes claims and nudges (``R.work.>``, ``R.queued.>``), its own direct work,
  cancels and admin (``R.agent.<id>.*``); answers on ``R.reply.>``, fetches bodies
  (``R.body.>``), takes from the queue (its consumers, ``MSG.NEXT``, acks), reports finished
  requests (``R.events.request``) and writes only its own state key (``$KV.R_agents.<id>``).
- registry: serves ``R.registry.>``, sends pulls to agents (``R.agent.*.work``, ``.ctl``) and reads
  their replies, its own only (``R.reply.registry.>``, ``R.body.registry.>``: each copy's requests
  name it ``registry.<copy>``, a token no gateway may take), hears a pull's cancel from its asker (``R.agent.registry.ctl``), probes agents on
  their ``.ctl``, writes the model index, load markers and dead-agent markers
  (``$KV.R_models.>``, ``$KV.R_views.>``), deletes the state of dead agents (``$KV.R_agents.>``),
  announces membership (``R.events.agent``); hears queued requests' nudges (``R.queued.>``) for
  demand-driven replicas.
- aggregator: hears finished requests (``R.events.request``), writes the views (``$KV.R_views.>``).
- operator (``corral status/pull/drain…``, `corral.client`, whoever creates the buckets and the
  stream): all of ``R.>`` and the JetStream API; reads replies and events, no other inbox.

Neither the gateway nor the agents may create or change a stream of the fleet: the operator identity
does, the Batch API's stores included.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.protocol.subjects import Subjects

ROLES = ("gateway", "registry", "aggregator", "operator")  # and "agent-<id>", "gateway-<id>"
AGENT_PREFIX = "agent-"
GATEWAY_PREFIX = "gateway-"
_API = "$JS.API"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = True


def inbox_prefix(user: str) -> str:
    """The one subject token that starts every reply subject of ``user``'s requests."""
    return f"_INBOX_{user}"


def agent_user(agent_id: str) -> str:
    return AGENT_PREFIX + agent_id


def gateway_user(gateway_id: str) -> str:
    return GATEWAY_PREFIX + gateway_id


def _key_buckets(s: Subjects) -> tuple[str, ...]:
    """The gateway's API keys, their usage and their per-minute counters (``CORRAL_AUTH=keys``)."""
    return (s.keys_bucket, s.usage_bucket, s.limits_bucket)


def _batch_kv(s: Subjects) -> tuple[str, ...]:
    return (s.batches_bucket, s.batch_results_bucket)


def _batch(s: Subjects) -> list[str]:
    """What a gateway's batch runner publishes, beyond reading its KV buckets (`_open_and_read`)."""
    files = s.object_stream(s.files_store)
    lines = s.batch_lines_stream
    return [
        s.batch_lines_all,
        s.object_subjects(s.files_store),
        *(s.kv_key(b, ">") for b in _batch_kv(s)),
        f"{_API}.STREAM.INFO.{files}",
        f"{_API}.STREAM.INFO.{lines}",
        f"{_API}.STREAM.NAMES",  # nats-py finds an object's stream by name before reading it
        f"{_API}.STREAM.PURGE.{files}",
        f"{_API}.STREAM.PURGE.{s.kv_stream(s.batch_results_bucket)}",
        f"{_API}.STREAM.MSG.GET.{files}",
        f"{_API}.DIRECT.GET.{files}",
        f"{_API}.DIRECT.GET.{files}.>",
        f"{_API}.CONSUMER.CREATE.{files}",
        f"{_API}.CONSUMER.CREATE.{files}.>",
        f"{_API}.CONSUMER.DELETE.{files}.>",
        f"{_API}.CONSUMER.INFO.{files}.>",
        f"$JS.FC.{files}.>",
        f"{_API}.CONSUMER.CREATE.{lines}.>",
        f"{_API}.CONSUMER.DURABLE.CREATE.{lines}.>",
        f"{_API}.CONSUMER.INFO.{lines}.>",
        f"{_API}.CONSUMER.MSG.NEXT.{lines}.>",
        f"$JS.ACK.{lines}.>",
    ]


def _open_and_read(s: Subjects, extra: tuple[str, ...] = ()) -> list[str]:
    out = [f"{_API}.STREAM.INFO.{s.queue_stream}"]
    for bucket in (*s.buckets, *extra):
        stream = s.kv_stream(bucket)
        out += [
            f"{_API}.STREAM.INFO.{stream}",
            f"{_API}.DIRECT.GET.{stream}",
            f"{_API}.DIRECT.GET.{stream}.>",
            f"{_API}.STREAM.MSG.GET.{stream}",
            f"{_API}.CONSUMER.CREATE.{stream}",
            f"{_API}.CONSUMER.CREATE.{stream}.>",
            f"{_API}.CONSUMER.DELETE.{stream}.>",
            f"{_API}.CONSUMER.INFO.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    return out


def role_permissions(role: str, s: Subjects) -> Permissions:
    """The rights of ``role`` (one of `ROLES`, or ``agent-<id>``) under the root of ``s``."""
    user = role
    read = _open_and_read(s)
    inbox = f"{inbox_prefix(user)}.>"
    if role.startswith(AGENT_PREFIX):
        return _agent(role.removeprefix(AGENT_PREFIX), s, read, inbox)
    if role.startswith(GATEWAY_PREFIX):
        return _gateway(s, inbox, role.removeprefix(GATEWAY_PREFIX))
    match role:
        case "gateway":
            return _gateway(s, inbox, None)
        case "registry":
            publish = [
                s.agent_all("work"),
                s.agent_all("ctl"),
                s.replies_all,
                s.event("agent"),
                s.kv_key(s.models_bucket, ">"),
                s.kv_key(s.views_bucket, ">"),
                s.kv_key(s.agents_bucket, ">"),
                *read,
            ]
            # demand-driven replicas hear each queued request's nudge, and a pull's cancel comes
            # from whoever asked for it
            subscribe = (
                f"{s.root}.registry.>",
                s.registry_ctl,
                s.registry_replies,
                s.registry_bodies,
                s.queued_all,
                inbox,
            )
            return Permissions(tuple(publish), subscribe)
        case "aggregator":
            publish = [s.kv_key(s.views_bucket, ">"), *read]
            return Permissions(tuple(publish), (s.event("request"), inbox))
        case "operator":
            publish = [
                f"{s.root}.>",
                f"{_API}.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                *(s.kv_key(b, ">") for b in (*s.buckets, *_key_buckets(s), *_batch_kv(s))),
                s.object_subjects(s.files_store),
            ]
            return Permissions(tuple(publish), (s.replies_all, s.bodies_all, s.events_all(), inbox))
    raise ValueError(
        f"unknown role {role!r}: one of {', '.join(ROLES)}, {AGENT_PREFIX}<id> or {GATEWAY_PREFIX}<id>"
    )


def _gateway(s: Subjects, inbox: str, gateway_id: str | None) -> Permissions:
    """A gateway: ``gateway_id`` (its ``--id``) scopes its replies and bodies to its own subjects,
    so one gateway cannot read another's; the shared ``gateway`` identity (None) reads them all."""
    publish = [
        s.work_all,
        s.agent_all("work"),
        s.agent_all("ctl"),
        s.queue_all,
        s.queued_all,
        s.registry("place"),
        s.registry("unplace"),
        s.registry("pull"),
        s.kv_key(s.sessions_bucket, ">"),
        s.kv_key(s.usage_bucket, ">"),
        s.kv_key(s.limits_bucket, ">"),
        f"{_API}.STREAM.MSG.DELETE.{s.queue_stream}",
        f"{_API}.STREAM.MSG.GET.{s.queue_stream}",  # whether a queued request was taken
        f"{_API}.CONSUMER.INFO.{s.queue_stream}.>",  # whether the queue's reader answers
        *_open_and_read(s, (*_key_buckets(s), *_batch_kv(s))),
        *_batch(s),
    ]
    if gateway_id is None:
        return Permissions(tuple(publish), (s.replies_all, s.bodies_all, inbox))
    return Permissions(tuple(publish), (s.reply_all(gateway_id), s.body_all(gateway_id), inbox))


def _agent(agent_id: str, s: Subjects, read: list[str], inbox: str) -> Permissions:
    q = s.queue_stream
    publish = [
        s.replies_all,
        s.bodies_all,
        s.event("request"),
        s.kv_key(s.agents_bucket, agent_id),
        f"{_API}.CONSUMER.CREATE.{q}.>",
        f"{_API}.CONSUMER.DURABLE.CREATE.{q}.>",
        f"{_API}.CONSUMER.MSG.NEXT.{q}.>",
        f"$JS.ACK.{q}.>",
        *read,
    ]
    subscribe = (
        s.work_all,
        s.queued_all,
        s.agent_work(agent_id),
        s.agent_ctl(agent_id),
        s.agent_admin(agent_id),
        inbox,
    )
    return Permissions(tuple(publish), subscribe)
