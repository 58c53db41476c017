"""Random work messages on every subject one running agent listens on, against a real nats-server.

Hypothesis sends random headers (the protocol's names with odd values, and junk names) and random
bodies to the agent's direct, control and claim subjects and into the fleet queue (published with
JetStream, then nudged), with a reply subject the test listens on, with junk ones, and with none;
some go out over a raw protocol connection, which can send what a well-behaved client refuses to
(header blocks that are not text, reply subjects that are not UTF-8).

The agent must never stop, no log record may carry a traceback, every reply stream that starts
must end (``end``, a head with ``Corral-End``, ``busy``; a control reply is one empty message)
within a bound, and afterwards the agent serves a plain request with nothing left in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import msgspec
import nats
import pytest
from corral.agent.agent import Agent
from corral.agent.settings import AgentSettings
from corral.protocol import headers as H
from corral.protocol.envelope import RequestEnvelope
from corral.protocol.messages import agent_state_decoder
from corral.protocol.names import parse_name
from corral.protocol.subjects import Subjects
from corral.runtime.nats import round_trip
from corral.runtime.natsserver import NatsServer
from corral.simulator.config import load_config
from corral.simulator.server import SimServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from tests.fuzz.logs import Tracebacks, capturing_tracebacks

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]

MODEL = "llama3.2"
TOKEN = parse_name(MODEL).token
BODY = msgspec.json.encode({"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
ROOT = "nfuzz"
INBOX = f"{ROOT}.reply.fz"  # every reply subject the test listens on is under it (agents answer only there)
BOUND_S = 8.0  # a reply stream that starts ends within this many seconds of its request
MIN_MESSAGES = 1500
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[Tracebacks]:
    with capturing_tracebacks() as handler:
        yield handler


@dataclass
class _Stream:
    """One reply subject the test listens on: when its request went out, what came back."""

    target: str
    sent: float
    got: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)

    def end_index(self) -> int | None:
        for i, (_, h, _) in enumerate(self.got):
            if self.target == "ctl" or h.get(H.KIND) in (H.END_KIND, H.BUSY) or h.get(H.END) == "1":
                return i
        return None


class _Raw:
    """A bare NATS protocol connection: publishes what nats-py would refuse to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: NatsServer) -> _Raw:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        raw = cls(reader, writer)
        await raw.sync()
        return raw

    def publish(self, subject: str, reply: bytes, header: bytes, payload: bytes) -> None:
        args = subject.encode() + (b" " + reply if reply else b"")
        self.writer.write(b"HPUB %s %d %d\r\n" % (args, len(header), len(header) + len(payload)))
        self.writer.write(header + payload + b"\r\n")

    async def sync(self) -> None:
        """Everything sent so far reached the server, which did not object."""
        self.writer.write(b"PING\r\n")
        async with asyncio.timeout(5):
            while (line := await self.reader.readline()) != b"PONG\r\n":
                assert not line.startswith(b"-ERR"), line
                assert line, "the server closed the raw connection"

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@dataclass
class _Rig:
    agent: Agent
    task: asyncio.Task[None]
    nc: NATS
    raw: _Raw
    subjects: Subjects
    streams: dict[str, _Stream] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=itertools.count)
    sent: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever a stream ends

    def new_reply(self, target: str) -> str:
        subject = f"{INBOX}.{next(self.counter)}"
        self.streams[subject] = _Stream(target, time.monotonic())
        return subject

    def target_subject(self, target: str) -> str:
        match target:
            case "direct":
                return self.subjects.agent_work(self.agent.id)
            case "ctl":
                return self.subjects.agent_ctl(self.agent.id)
            case "claim_any":
                return self.subjects.work("any", TOKEN)
            case "claim_vendor":
                return self.subjects.work("cpu", TOKEN)
        raise AssertionError(target)

    def open_streams(self) -> list[str]:
        return [s for s, st in self.streams.items() if st.got and st.end_index() is None]


async def _plain(rig: _Rig, rid: str) -> dict[str, str]:
    """A well-formed request on the direct subject; the headers of the message that ends it."""
    sub = await rig.nc.subscribe(f"{rig.subjects.root}.reply.fuzz.{rig.nc.new_inbox().rsplit('.', 1)[-1]}")
    try:
        headers = RequestEnvelope(rid=rid, endpoint="/api/generate", model=TOKEN).headers()
        await rig.nc.publish(rig.subjects.agent_work(rig.agent.id), BODY, reply=sub.subject, headers=headers)
        async with asyncio.timeout(10):
            while True:
                h = (await sub.next_msg(timeout=10)).headers or {}
                if h.get(H.KIND) in (H.END_KIND, H.BUSY) or h.get(H.END) == "1":
                    return h
    finally:
        await sub.unsubscribe()


@pytest.fixture(scope="module")
async def rig(nats_server: NatsServer, tracebacks: Tracebacks) -> AsyncIterator[_Rig]:
    sim = SimServer(load_config(None, time_scale=0.0, num_parallel=2), host="127.0.0.1", port=0)
    await sim.start()
    settings_ = AgentSettings(
        nats_url=nats_server.url,
        root=ROOT,
        id="a1",
        ollama_url=sim.url,
        vendor="cpu",
        parallel=2,
        max_queue=4,
        refresh_s=0.5,
        heartbeat_s=1.0,
        ping_interval_s=0.5,
    )
    agent = Agent(settings_)
    task = asyncio.create_task(agent.run())
    nc = await nats.connect(nats_server.url)
    raw = await _Raw.open(nats_server)
    try:
        async with asyncio.timeout(10):
            await agent.ready.wait()
        r = _Rig(agent, task, nc, raw, Subjects(ROOT))

        async def collect(msg: Msg) -> None:
            stream = r.streams.get(msg.subject)
            if stream is not None and H.NATS_STATUS not in (msg.headers or {}):  # not "no responders"
                stream.got.append((time.monotonic(), dict(msg.headers or {}), msg.data))
                if stream.end_index() is not None:
                    r.ended.set()

        await nc.subscribe(f"{INBOX}.>", cb=collect)
        assert (await _plain(r, "warm")).get(H.STATUS) == "200"
        await agent._refresh()  # the model ran at its default context: warm, claims armed
        assert TOKEN in agent.runners.warm
        await agent._reconcile()
        assert agent.nc is not None
        assert await round_trip(agent.nc, 10.0)
        yield r
    finally:
        await raw.close()
        await nc.close()
        await agent.stop()
        await task
        await sim.stop()
    assert not tracebacks.records, [(r.getMessage(), r.exc_info) for r in tracebacks.records]


# -- what goes on the wire -------------------------------------------------------------------

_RIDS = st.sampled_from([f"r{i}" for i in range(8)])  # a small pool: cancels find running requests
_odd_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300),
    st.sampled_from(["", " ", "\x00", "\t", "é" * 200, "a" * 5000, "..", "*", ">", "\ufffd", "١٢٣"]),
    st.integers().map(str),
    st.floats().map(str),
    st.sampled_from([None, True, [], {}, b"\xff"]).map(repr),
)
_now_ms = int(time.time() * 1000)
_VALUES: dict[str, st.SearchStrategy[str]] = {
    H.REQUEST: st.one_of(_RIDS, _odd_text),
    H.ENDPOINT: st.one_of(
        st.sampled_from(
            [
                "/api/generate",
                "/api/chat",
                "/api/embed",
                "/api/embeddings",
                "/api/show",
                "/api/tags",
                "/api/ps",
                "/api/version",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/models",
                "/api/../api/tags",
                "/api",
                "/v1/",
                "/etc/passwd",
            ]
        ),
        _odd_text,
    ),
    H.METHOD: st.one_of(
        st.sampled_from(["GET", "HEAD", "POST", "PUT", "post", "PATCH", "OPTIONS"]), _odd_text
    ),
    H.DEADLINE: st.one_of(
        st.sampled_from(["0", str(_now_ms + 600_000), str(_now_ms - 1), "9" * 40, "-1", "1e12", "0x10"]),
        _odd_text,
    ),
    H.MODEL: st.one_of(
        st.sampled_from([TOKEN, "nope=3Alatest", "=C3", "A B", "llama3.2:latest", ""]), _odd_text
    ),
    H.ECHO_MODEL: st.one_of(st.just(MODEL), _odd_text),
    H.UPSTREAM_MODEL: st.one_of(st.just(f"{MODEL}:latest"), _odd_text),
    H.BODY_SIZE: st.one_of(st.sampled_from(["1", "100", str(1 << 40), str(1 << 41), "0"]), _odd_text),
    H.ORIGIN: st.one_of(st.sampled_from(["gw1", "nobody"]), _odd_text),
    H.NUM_CTX: st.one_of(st.sampled_from(["0", "2048", str(1 << 24), str(1 << 25)]), _odd_text),
    H.UNLOAD: _odd_text,
    H.CTL: st.one_of(st.sampled_from([H.CANCEL, H.CANCEL, H.UNCORDON, H.CORDON, H.DRAIN]), _odd_text),
    H.TRACEPARENT: st.one_of(
        st.sampled_from(
            ["00-" + "a" * 32 + "-" + "b" * 16 + "-01", "ff-" + "0" * 32 + "-" + "0" * 16 + "-00"]
        ),
        _odd_text,
    ),
    H.TRACESTATE: st.one_of(st.sampled_from(["a=b", "a=b," * 40, "=", "k=" + "v" * 600]), _odd_text),
}
_OTHER_NAMES = [
    H.KIND,
    H.AGENT,
    H.STATUS,
    H.CONTENT_TYPE,
    H.SEQ,
    H.END,
    H.ERROR,
    H.ERROR_CODE,
    H.NATS_STATUS,
    "Nats-Msg-Id",
    "corral-request",
    "CORRAL-ENDPOINT",
    "X-Junk",
    "~!#$%&'*+-.^_`|",
]
_names = st.one_of(
    st.sampled_from([*_VALUES, *_OTHER_NAMES]),
    st.text(
        st.characters(whitelist_categories=["Lu", "Ll", "Nd"], max_codepoint=0x7F), min_size=1, max_size=20
    ),
)
_junk_headers = st.dictionaries(_names, _odd_text, max_size=6)


# well-formed fields that take the agent down its other paths: a body to fetch from a sender that
# is gone, a deadline passed, an unload, a restored model name, a context size, a trace
_WELL_FORMED = st.sampled_from(
    [
        {},
        {H.BODY_SIZE: "100", H.ORIGIN: "gone"},
        {H.DEADLINE: str(_now_ms - 1)},
        {H.UNLOAD: "1"},
        {H.ECHO_MODEL: MODEL, H.UPSTREAM_MODEL: f"{MODEL}:latest"},
        {H.NUM_CTX: "4096"},
        {H.TRACEPARENT: "00-" + "a" * 32 + "-" + "b" * 16 + "-01", H.TRACESTATE: "k=v"},
    ]
)


@st.composite
def _envelope_headers(draw: st.DrawFn) -> dict[str, str]:
    """A valid envelope with some fields replaced by odd values, some removed, junk added."""
    rid = draw(_RIDS)
    h = RequestEnvelope(rid=rid, endpoint="/api/generate", model=TOKEN).headers()
    h.update(draw(_WELL_FORMED))
    for name in draw(st.lists(st.sampled_from(sorted(_VALUES)), max_size=3, unique=True)):
        h[name] = draw(_VALUES[name])
    for name in draw(st.lists(st.sampled_from(sorted(h)), max_size=1)):
        del h[name]
    h.update(draw(_junk_headers.filter(lambda j: len(j) <= 2)))
    return h


_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _odd_text)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_odd_text, inner, max_size=4)),
    max_leaves=10,
)
_bodies = st.one_of(
    st.just(BODY),
    st.binary(max_size=300),
    _json.map(msgspec.json.encode),
    st.fixed_dictionaries(
        {"model": st.sampled_from([MODEL, "nope"])},
        optional={"prompt": _json, "stream": _json, "messages": _json, "input": _json, "options": _json},
    ).map(msgspec.json.encode),
    st.sampled_from([b"", b"{", b"\xff\xfe{}", b"null", b"x" * 70_000]),
)
_JUNK_REPLIES = [
    "nobody.listens",
    "a..b",
    "x.*",
    "fzjunk.>",
    "_INBOX.gone",
    f"{ROOT}.reply.gone.1",
    f"$KV.{ROOT}_agents.victim",
    "q" * 255,
    "not a subject",
    "é.x",
]
# raw header blocks: status lines, lines without colons, bytes that are not UTF-8, empty names
_RAW_HEADERS = st.one_of(
    st.sampled_from(
        [
            b"NATS/1.0\r\n\r\n",
            b"NATS/1.0 503\r\n\r\n",
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Consumer-Stalled: x.y\r\n\r\n",
            b"NATS/1.0\r\nCorral-Request: r1\r\nCorral-Endpoint: /api/tags\r\nCorral-Method: GET\r\n\r\n",
            b"NATS/1.0\r\nCorral-Request: \xff\xfe\r\nCorral-Endpoint: /api/\xc3\r\n\r\n",
            b"NATS/1.0\r\nno colon here\r\n: empty name\r\nCorral-Ctl: cancel\r\n\r\n",
            b"NATS/1.0\r\n\xff\xff: v\r\nCorral-Reply: fzjunk.\xff\r\n\r\n",
        ]
    ),
    st.binary(max_size=60).map(lambda b: b"NATS/1.0\r\nX-B: " + b.replace(b"\r\n", b"  ") + b"\r\n\r\n"),
)
_TARGETS = ["direct", "ctl", "claim_any", "claim_vendor", "queue_any", "queue_vendor"]


@dataclass(frozen=True)
class _Shot:
    target: str
    headers: dict[str, str]
    body: bytes
    reply: str  # "listen": a reply subject the test listens on; "" none; else a junk subject
    header_reply: str  # the same choices for Corral-Reply


_replies = st.one_of(st.just("listen"), st.just(""), st.sampled_from(_JUNK_REPLIES))
_shots = st.builds(
    _Shot,
    target=st.sampled_from(_TARGETS),
    headers=st.one_of(_envelope_headers(), _envelope_headers(), _junk_headers),
    body=_bodies,
    reply=_replies,
    header_reply=st.one_of(st.just(""), _replies),
)


@dataclass(frozen=True)
class _RawShot:
    target: str
    header: bytes
    body: bytes
    reply: bytes  # b"listen": one the test listens on


_raw_shots = st.builds(
    _RawShot,
    target=st.sampled_from(["direct", "ctl", "claim_any"]),
    header=_RAW_HEADERS,
    body=st.binary(max_size=100),
    reply=st.sampled_from([b"listen", b"", b"fzjunk.\xff\xfe", b"\xc3(", b"fzjunk.*", b"fzjunk..x"]),
)


async def _send(rig: _Rig, shot: _Shot) -> None:
    headers = {k: v for k, v in shot.headers.items() if v.strip() or k in (H.UNLOAD,)}
    reply = rig.new_reply(shot.target) if shot.reply == "listen" else shot.reply
    if shot.header_reply:
        headers[H.REPLY] = rig.new_reply(shot.target) if shot.header_reply == "listen" else shot.header_reply
    if shot.target.startswith("queue"):
        vendor = "any" if shot.target == "queue_any" else "cpu"
        js = rig.nc.jetstream()
        try:
            await js.publish(rig.subjects.queue(vendor, TOKEN), shot.body, headers=headers, timeout=2.0)
        except (NatsError, JetStreamError, TimeoutError):
            return  # refused by JetStream (a junk Nats-* header, a full queue): never reached the agent
        await rig.nc.publish(rig.subjects.queued(vendor, TOKEN), b"")
    else:
        try:
            await rig.nc.publish(rig.target_subject(shot.target), shot.body, reply=reply, headers=headers)
        except NatsError:  # nats-py refuses this subject or header name itself
            return
    rig.sent += 1


@FUZZ
@given(shots=st.lists(_shots, min_size=6, max_size=12), raw=st.lists(_raw_shots, max_size=2))
async def test_random_messages_on_every_agent_subject(
    rig: _Rig, shots: list[_Shot], raw: list[_RawShot]
) -> None:
    for shot in shots:
        await _send(rig, shot)
    for r in raw:
        reply = rig.new_reply(r.target).encode() if r.reply == b"listen" else r.reply
        rig.raw.publish(rig.target_subject(r.target), reply, r.header, r.body)
        rig.sent += 1
    await rig.raw.sync()
    assert await round_trip(rig.nc, 10.0)
    assert not rig.task.done(), rig.task
    assert rig.agent.nc is not None and rig.agent.nc.is_connected


async def test_every_reply_stream_ended_and_the_agent_still_serves(rig: _Rig) -> None:
    assert rig.sent >= MIN_MESSAGES
    assert not rig.task.done()
    # a drain or cordon among the messages left it refusing work; the ack comes once it is active
    await rig.nc.request(rig.subjects.agent_admin(rig.agent.id), b"", headers={H.CTL: H.UNCORDON}, timeout=5)
    assert rig.agent.status == "active"
    try:
        async with asyncio.timeout(BOUND_S):
            while rig.open_streams():
                rig.ended.clear()
                await rig.ended.wait()
    except TimeoutError:
        raise AssertionError({s: rig.streams[s] for s in rig.open_streams()}) from None
    await _settled(rig)  # requests answered on junk reply subjects finish unseen: wait for them too
    assert (await _plain(rig, "final")).get(H.STATUS) == "200"
    for subject, stream in rig.streams.items():
        if not stream.got:
            continue  # dropped: no answer at all is allowed
        end = stream.end_index()
        assert end is not None, (subject, stream)
        assert stream.got[end][0] - stream.sent <= BOUND_S, (subject, stream)
        assert end == len(stream.got) - 1, ("messages after the end", subject, stream)
        if stream.target == "ctl":
            assert stream.got[end][1:] == ({}, b""), ("a control ack is empty", subject, stream)
    state = rig.agent.state()
    assert state.in_flight == 0 and state.queued == 0
    assert not rig.task.done()


async def _settled(rig: _Rig) -> None:
    """Until the agent publishes a state with nothing in flight and nothing waiting (it publishes
    every change that lasts, and every heartbeat) and its live state agrees."""
    kv = await rig.nc.jetstream().key_value(rig.subjects.agents_bucket)
    watcher = await kv.watch(rig.agent.id)
    try:
        async with asyncio.timeout(BOUND_S):
            while True:
                entry = await watcher.updates(timeout=BOUND_S)
                if entry is None or entry.value is None:
                    continue  # the end of the initial values, or a delete
                published, live = agent_state_decoder.decode(entry.value), rig.agent.state()
                if published.in_flight == live.in_flight == 0 and published.queued == live.queued == 0:
                    return
    finally:
        await watcher.stop()
