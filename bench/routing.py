"""Routing policies compared on a simulated fleet: the same seeded workloads through the gateway
under each ``X-Load-Balancing-Strategy``, each on a fresh fleet.

    .venv/bin/python -m bench.routing [--quick] [--seed N] [--workloads skewed,chat,burst,num_ctx]
                                      [--policies auto,round_robin,random,least_connection]
                                      [--repeat N] [--time-scale 0.2] [--cap 150] [--json FILE]

The fleet (`LocalFleet`, in this process, as ``corral up`` runs it): an embedded nats-server, a
registry, an aggregator, six simulated GPU servers of mixed vendors, VRAM sizes, speeds and
parallel slots (`MACHINES`), one agent each, and the gateway on a real socket. Every simulator
has the same model catalogue on disk (`MODELS`, 1.3 to 9 GB; the 12 GB card lacks the 14B model),
nothing loaded, ``OLLAMA_CONTEXT_LENGTH=4096`` and keep_alive 5m.
Simulated time runs ``1 / time_scale`` times faster than the wall clock; every time below is in
simulated seconds (wall ÷ time_scale), so loads of seconds and decode rates keep their real
proportions. The control plane's periods (`SCALED_PERIODS`: how often an agent re-reads its
Ollama, how often the registry checks the overflow queue for replicas, how often a queued request
checks that its model is still served, how long a load just started counts as under way) are
scaled the same way, so they keep their default length in simulated time; timeouts (claim, idle,
queue) are failure detection and stay at their wall-clock defaults: ``--time-scale 1`` runs in
real time.

Workloads (all from ``random.Random(seed)``, identical for every policy; replies are bounded by
``num_predict`` and every simulator has the same seed, so the tokens generated do not depend on
where a request runs):

``skewed``
    Streaming ``/api/generate`` over six models with Zipf-like popularity (s = 1.2), prompts of
    50–800 tokens, closed loop with 12 concurrent clients.
``chat``
    Multi-turn ``/api/chat`` conversations (two models, each with its own long system prompt), each
    turn resending the whole history with the previous replies; one closed loop per conversation
    with a think time between turns. Both models are loaded on every server before the clock starts
    (directly on the simulators, the same for every policy), so where the turns go alone decides
    whether a prompt cache is reused. Reports the mean prompt eval time per turn index: with the
    cache reused, later turns evaluate only the new message; without it, the whole history.
``burst``
    50 concurrent streaming requests for a model no agent has loaded (phi4:14b); counts the loads
    across the fleet.
``num_ctx``
    Two models with ``options.num_ctx`` drawn from {default, 2048, 8192} (prompt sizes to match),
    closed loop with 8 concurrent clients; a runner loaded with another context must reload.

The JSON file (``--json``, default ``bench/results/routing.json``) has the same figures, the
per-turn table, requests and loads per agent, and every request (start, TTFT, end to end, tokens,
prompt eval, load wait, error) for looking into a tail.

Per workload and policy: TTFT p50/p95 (first NDJSON chunk), end-to-end p95, generated tokens per
simulated second, cold loads (a model loaded on a server that did not have it loaded, after an
eviction too), reloads (a loaded runner replaced for another num_ctx), evictions — the simulators'
own counters — and errors; then auto's ratios against round_robin and random from the same run and
a verdict line. A run longer than ``--cap`` wall seconds is cut off (open requests count as errors).
Timing still varies between runs of the same seed (what NATS and the event loop interleave decides
some placements): ``--repeat N`` pools N fresh-fleet runs per workload and policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from corral.agent.settings import AgentSettings
from corral.gateway.settings import GatewaySettings
from corral.protocol.names import parse_name
from corral.registry.settings import RegistrySettings
from corral.routing import STRATEGIES, Router
from corral.simulator import SimConfig, load_config
from corral.up import FleetOptions, LocalFleet

from bench.common import (
    _Conn,
    connect,
    cpu_seconds,
    fetch,
    fmt,
    loop_name,
    machine,
    percentile,
    post,
    post_with_headers,
    run,
    table,
    write_json,
)

HOST = "127.0.0.1"
POLICIES = ("auto", "round_robin", "random", "least_connection")
BASELINES = ("round_robin", "random")
WORKLOADS = ("skewed", "chat", "burst", "num_ctx")
STRATEGY_HEADER = "X-Load-Balancing-Strategy"
DEFAULT_TIME_SCALE = 0.2
DEFAULT_JSON = Path(__file__).parent / "results" / "routing.json"
REQUEST_TIMEOUT_S = 180.0  # wall seconds; the gateway answers 503 long before (queue timeout)
CONTEXT_LENGTH = 4096  # OLLAMA_CONTEXT_LENGTH on every simulated server
# polling periods (seconds) scaled like the simulator's clock, where the settings have them
SCALED_PERIODS: tuple[tuple[type[Any], str], ...] = (
    (AgentSettings, "refresh_s"),  # re-read the backend's /api/tags and /api/ps
    (RegistrySettings, "replica_check_s"),  # read the overflow queue's depth for replicas
    (RegistrySettings, "load_grace_s"),  # a load marker is live this long before its agent shows it
    (GatewaySettings, "load_grace_s"),  # the same for the gateway's own load markers
    (GatewaySettings, "queue_recheck_s"),  # a queued request re-checks that its model is served
)
MIN_PERIOD_S = 0.1

# -- the fleet --------------------------------------------------------------------------------------
# vendor, GPU, VRAM (GiB), speed (relative decode/load rate), OLLAMA_NUM_PARALLEL
MACHINES: tuple[tuple[str, str, float, float, int], ...] = (
    ("nvidia", "RTX 4090", 24, 1.0, 2),
    ("amd", "Radeon RX 7900 XTX", 24, 0.9, 2),
    ("nvidia", "RTX 4080", 16, 0.8, 2),
    ("amd", "Radeon PRO W7800", 32, 0.85, 4),
    ("nvidia", "RTX 3060", 12, 0.55, 1),
    ("nvidia", "RTX A6000", 48, 0.9, 4),
)
BIG_MODEL = "phi4:14b"
SMALL_CARD_GIB = 12  # cards this small do not have BIG_MODEL on disk

MODELS: tuple[dict[str, Any], ...] = (
    {"name": "llama3.2:1b", "size_gb": 1.321, "parameter_size": "1.2B", "block_count": 16},
    {"name": "llama3.2:3b", "size_gb": 2.019, "parameter_size": "3.2B", "block_count": 28},
    {
        "name": "gemma3:4b",
        "size_gb": 3.338,
        "parameter_size": "4.3B",
        "family": "gemma3",
        "block_count": 34,
        "head_count_kv": 4,
        "head_dim": 256,
    },
    {"name": "mistral:7b", "size_gb": 4.372, "parameter_size": "7.2B", "block_count": 32},
    {
        "name": "deepseek-r1:7b",
        "size_gb": 4.683,
        "parameter_size": "7.6B",
        "family": "qwen2",
        "capabilities": ["completion", "thinking"],
        "block_count": 28,
        "head_count_kv": 4,
    },
    {
        "name": "qwen3:8b",
        "size_gb": 5.225,
        "parameter_size": "8.2B",
        "family": "qwen3",
        "capabilities": ["completion", "tools", "thinking"],
        "block_count": 36,
    },
    {
        "name": BIG_MODEL,
        "size_gb": 9.053,
        "parameter_size": "14.7B",
        "family": "phi3",
        "context_length": 16384,
        "block_count": 40,
        "head_count_kv": 10,
    },
)

# -- workload shapes ----------------------------------------------------------------------------------
SKEWED_MODELS = ("llama3.2:3b", "qwen3:8b", "mistral:7b", "gemma3:4b", "llama3.2:1b", "deepseek-r1:7b")
ZIPF_S = 1.2
CHAT_MODELS = (("mistral:7b", 2), ("llama3.2:3b", 1))  # (model, weight)
NUM_CTX_MODELS = ("gemma3:4b", "llama3.2:3b")
# (num_ctx or None for the server default, weight, prompt tokens range)
NUM_CTX_CHOICES: tuple[tuple[int | None, int, tuple[int, int]], ...] = (
    (None, 2, (200, 2500)),
    (2048, 1, (100, 1500)),
    (8192, 1, (2500, 6000)),
)

_VOCAB = (
    "the of and to in is for on that by this with you it not or be are from at as your all have new "
    "more an was we will can us about if page my has search free but our one other do no information "
    "time they site he up may what which their news out use any there see only so his when contact "
    "here business who web also now help get view online first been would how were me services some "
    "these click its like service than find price date back top people had list name just over state "
    "year day into email two health world next used go work last most products music buy data make "
    "them should product system post her city add policy number such please available copyright "
    "support message after best software then jan good video well where info rights public books "
    "high school through each links she review years order very privacy book items company read group"
).split()


@dataclass(frozen=True)
class Knobs:
    """Request counts; ``--quick`` shrinks them to a smoke run."""

    skewed_requests: int = 240
    skewed_concurrency: int = 12
    chats: int = 16
    chat_turns: int = 6
    burst: int = 50
    num_ctx_requests: int = 120
    num_ctx_concurrency: int = 8


QUICK = Knobs(
    skewed_requests=36,
    skewed_concurrency=6,
    chats=4,
    chat_turns=3,
    burst=12,
    num_ctx_requests=24,
    num_ctx_concurrency=4,
)


def scaled_periods(time_scale: float) -> dict[type[Any], dict[str, float]]:
    """Settings class → {field: default × time_scale} for the `SCALED_PERIODS` that class has."""
    out: dict[type[Any], dict[str, float]] = {}
    for cls, name in SCALED_PERIODS:
        default = {f.name: f.default for f in msgspec.structs.fields(cls)}.get(name)
        if isinstance(default, int | float) and default > 0:
            out.setdefault(cls, {})[name] = max(float(default) * time_scale, MIN_PERIOD_S)
    return out


def fleet_sims(seed: int, time_scale: float) -> list[SimConfig]:
    """One `SimConfig` per machine in `MACHINES`."""
    out = []
    for vendor, gpu, vram, speed, parallel in MACHINES:
        models = [m | {"pulled": not (m["name"] == BIG_MODEL and vram <= SMALL_CARD_GIB)} for m in MODELS]
        out.append(
            load_config(
                None,
                vendor=vendor,
                gpus=[{"name": gpu, "vram_gb": vram}],
                speed=speed,
                num_parallel=parallel,
                time_scale=time_scale,
                context_length=CONTEXT_LENGTH,
                keep_alive="5m",
                reply_tokens=(512, 768),  # longer than any num_predict below: num_predict decides
                seed=seed,
                models=models,
            )
        )
    return out


# -- planned requests -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    """One request of an open or closed loop workload."""

    path: str
    body: dict[str, Any]
    model: str
    num_ctx: int | None = None


@dataclass(frozen=True)
class Turn:
    user: str
    num_predict: int
    think_s: float  # simulated seconds before this turn is sent


@dataclass(frozen=True)
class Conversation:
    model: str
    system: str
    start_s: float  # simulated seconds after the workload starts
    turns: tuple[Turn, ...]


def words(rng: random.Random, n: int) -> str:
    """``n`` tokens of text for the simulator's tokenizer (one word = one token)."""
    return " ".join(rng.choices(_VOCAB, k=n))


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    raw = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def plan_skewed(rng: random.Random, k: Knobs) -> list[Planned]:
    weights = zipf_weights(len(SKEWED_MODELS))
    out = []
    for _ in range(k.skewed_requests):
        model = rng.choices(SKEWED_MODELS, weights=weights)[0]
        out.append(_streamed(rng, model, (50, 800), (24, 160)))
    return out


def _streamed(
    rng: random.Random, model: str, prompt_words: tuple[int, int], num_predict: tuple[int, int]
) -> Planned:
    """A streaming ``/api/generate`` for ``model``; prompt and reply lengths drawn from the ranges."""
    body = {
        "model": model,
        "prompt": words(rng, rng.randint(*prompt_words)),
        "stream": True,
        "options": {"num_predict": rng.randint(*num_predict)},
    }
    return Planned("/api/generate", body, model)


def plan_chats(rng: random.Random, k: Knobs) -> list[Conversation]:
    models = [m for m, _ in CHAT_MODELS]
    weights = [w for _, w in CHAT_MODELS]
    out = []
    for _ in range(k.chats):
        turns = tuple(
            Turn(
                user=words(rng, rng.randint(60, 220)),
                num_predict=rng.randint(60, 160),
                think_s=0.0 if t == 0 else min(rng.expovariate(1 / 4.0), 12.0),
            )
            for t in range(k.chat_turns)
        )
        out.append(
            Conversation(
                model=rng.choices(models, weights=weights)[0],
                system=words(rng, rng.randint(500, 1000)),
                start_s=rng.uniform(0.0, 6.0),
                turns=turns,
            )
        )
    return out


def plan_burst(rng: random.Random, k: Knobs) -> list[Planned]:
    return [_streamed(rng, BIG_MODEL, (50, 400), (24, 96)) for _ in range(k.burst)]


def plan_num_ctx(rng: random.Random, k: Knobs) -> list[Planned]:
    weights = [w for _, w, _ in NUM_CTX_CHOICES]
    out = []
    for _ in range(k.num_ctx_requests):
        model = rng.choice(NUM_CTX_MODELS)
        num_ctx, _, (lo, hi) = rng.choices(NUM_CTX_CHOICES, weights=weights)[0]
        options: dict[str, Any] = {"num_predict": rng.randint(24, 128)}
        if num_ctx is not None:
            options["num_ctx"] = num_ctx
        body = {"model": model, "prompt": words(rng, rng.randint(lo, hi)), "stream": True, "options": options}
        out.append(Planned("/api/generate", body, model, num_ctx))
    return out


# -- one request ------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One request as the client saw it; times in simulated seconds."""

    model: str
    ok: bool = False
    status: int = 0
    error: str = ""
    t_start: float = 0.0  # since the workload started
    ttft: float = math.nan
    e2e: float = math.nan
    eval_count: int = 0
    prompt_eval_count: int = 0
    prompt_eval_s: float = 0.0
    load_s: float = 0.0
    num_ctx: int | None = None
    conv: int = -1
    turn: int = -1
    run: int = 0  # which repetition (``--repeat``)


_line = msgspec.json.Decoder()


class Client:
    """One keep-alive connection to the gateway, sending with one strategy header."""

    def __init__(self, port: int, policy: str, scale: float, t0: float) -> None:
        self.port = port
        self.headers = {STRATEGY_HEADER: policy}
        self.scale = scale
        self.t0 = t0
        self.conn: _Conn | None = None

    async def open(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = await connect(HOST, self.port)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def send(self, path: str, body: dict[str, Any], sample: Sample) -> str:
        """Send, fill ``sample``; returns the reply text (the assistant's content)."""
        raw = post_with_headers(HOST, self.port, path, msgspec.json.encode(body), self.headers)
        try:
            await self.open()
        except OSError as e:
            sample.error = f"connect: {e}"
            return ""
        assert self.conn is not None
        conn = self.conn
        try:
            r = await asyncio.wait_for(conn.request(raw, keep_body=True), REQUEST_TIMEOUT_S)
        except TimeoutError:
            self.close()
            sample.error = f"no complete reply within {REQUEST_TIMEOUT_S:.0f}s"
            return ""
        sample.t_start = (r.t_start - self.t0) / self.scale
        sample.status = r.status
        if r.error:
            self.close()
            sample.error = r.error
            return ""
        sample.ttft = r.ttft / self.scale
        sample.e2e = r.latency / self.scale
        return _parse(bytes(conn.body), sample)


def _parse(body: bytes, sample: Sample) -> str:
    """Read an NDJSON reply into ``sample``; returns the concatenated reply text."""
    text: list[str] = []
    final: dict[str, Any] | None = None
    for raw in body.split(b"\n"):
        if not raw.strip():
            continue
        try:
            obj = _line.decode(raw)
        except msgspec.DecodeError:
            sample.error = f"undecodable line: {raw[:80]!r}"
            return ""
        if not isinstance(obj, dict):
            continue
        if "error" in obj:
            sample.error = str(obj["error"])[:200]
            return ""
        msg = obj.get("message")
        piece = msg.get("content") if isinstance(msg, dict) else obj.get("response")
        if isinstance(piece, str):
            text.append(piece)
        if obj.get("done"):
            final = obj
    if sample.status != 200:
        sample.error = sample.error or f"HTTP {sample.status}"
        return ""
    if final is None:
        sample.error = "stream ended without a done chunk"
        return ""
    sample.ok = True
    sample.eval_count = int(final.get("eval_count", 0))
    sample.prompt_eval_count = int(final.get("prompt_eval_count", 0))
    sample.prompt_eval_s = int(final.get("prompt_eval_duration", 0)) / 1e9  # simulated already
    sample.load_s = int(final.get("load_duration", 0)) / 1e9
    return "".join(text)


# -- drivers --------------------------------------------------------------------------------------
# Each driver opens its connections before the clock starts and returns (samples, wall seconds). A
# run longer than ``cap`` wall seconds is cut off: requests still open count as errors, requests not
# sent yet are not counted.
CUT_OFF = "cut off: the run exceeded its time cap"


async def _timed(clients: Sequence[Client], work: Any, samples: list[Sample], cap: float) -> float:
    t0 = time.perf_counter()
    for c in clients:
        c.t0 = t0
    try:
        async with asyncio.timeout(cap):
            await work
    except TimeoutError:
        for s in samples:
            if not s.ok and not s.error:
                s.error = CUT_OFF
    finally:
        for c in clients:
            c.close()
    return time.perf_counter() - t0


async def drive_closed(
    port: int, policy: str, scale: float, plans: Sequence[Planned], concurrency: int, cap: float
) -> tuple[list[Sample], float]:
    """``concurrency`` clients take the planned requests in order, each sending its next as soon
    as its last one finished."""
    clients = [Client(port, policy, scale, 0.0) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in clients))
    samples: list[Sample] = []
    todo: Iterator[Planned] = iter(plans)

    async def worker(c: Client) -> None:
        for p in todo:
            s = Sample(model=p.model, num_ctx=p.num_ctx)
            samples.append(s)
            await c.send(p.path, p.body, s)

    wall = await _timed(clients, asyncio.gather(*(worker(c) for c in clients)), samples, cap)
    return samples, wall


async def drive_burst(
    port: int, policy: str, scale: float, plans: Sequence[Planned], cap: float
) -> tuple[list[Sample], float]:
    """Every planned request at once, each on its own connection."""
    clients = [Client(port, policy, scale, 0.0) for _ in plans]
    await asyncio.gather(*(c.open() for c in clients))
    samples = [Sample(model=p.model, num_ctx=p.num_ctx) for p in plans]
    sends = (c.send(p.path, p.body, s) for c, p, s in zip(clients, plans, samples, strict=True))
    wall = await _timed(clients, asyncio.gather(*sends), samples, cap)
    return samples, wall


async def drive_chats(
    port: int, policy: str, scale: float, convs: Sequence[Conversation], cap: float
) -> tuple[list[Sample], float]:
    """One closed loop per conversation: wait the think time, send the whole history plus the new
    user message, append the reply, repeat. A failed turn ends its conversation."""
    clients = [Client(port, policy, scale, 0.0) for _ in convs]
    await asyncio.gather(*(c.open() for c in clients))
    samples: list[Sample] = []

    async def talk(i: int, conv: Conversation, c: Client) -> None:
        await asyncio.sleep(conv.start_s * scale)
        messages: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
        for t, turn in enumerate(conv.turns):
            await asyncio.sleep(turn.think_s * scale)
            messages.append({"role": "user", "content": turn.user})
            body = {
                "model": conv.model,
                "messages": messages,
                "stream": True,
                "options": {"num_predict": turn.num_predict},
            }
            s = Sample(model=conv.model, conv=i, turn=t)
            samples.append(s)
            reply = await c.send("/api/chat", body, s)
            if not s.ok:
                return
            messages.append({"role": "assistant", "content": reply})

    talks = (talk(i, conv, c) for i, (conv, c) in enumerate(zip(convs, clients, strict=True)))
    wall = await _timed(clients, asyncio.gather(*talks), samples, cap)
    return samples, wall


# -- one run: a workload under one policy on a fresh fleet ------------------------------------------
_COUNTERS = (
    "started",
    "finished",
    "loads",
    "reloads",
    "evictions",
    "expirations",
    "load_aborts",
    "busy_rejections",
    "prompt_tokens",
    "prompt_tokens_evaluated",
    "prompt_tokens_cached",
    "generated_tokens",
)


class LogCounter(logging.Handler):
    """Counts warnings by logger and message template (e.g. the gateway's claim timeouts)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.name}: {record.msg}"] += 1


@dataclass
class RunResult:
    workload: str
    policy: str
    samples: list[Sample]
    wall_s: float
    scale: float
    fleet: dict[str, int]  # summed simulator counters during the workload
    agents: dict[str, dict[str, int]]  # per agent: requests started, loads, reloads
    cpu_self_pct: float  # this process (simulators, agents, gateway, load generator), % of one core
    cpu_nats_pct: float
    warnings: dict[str, int] = field(default_factory=dict)
    runs: int = 1  # repetitions pooled here (`pool`)

    @property
    def sim_s(self) -> float:
        return self.wall_s / self.scale

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        ttft = [s.ttft for s in ok]
        e2e = [s.e2e for s in ok]
        tokens = sum(s.eval_count for s in ok)
        f = self.fleet
        return {
            "requests": len(self.samples),
            "errors": self.errors,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_p95_s": percentile(e2e, 95),
            "tokens": tokens,
            "tokens_per_s": tokens / self.sim_s if self.sim_s > 0 else math.nan,
            "cold_loads": self._per_run(f["loads"] - f["reloads"]),
            "reloads": self._per_run(f["reloads"]),
            "evictions": self._per_run(f["evictions"]),
            "runs": self.runs,
            "requests_waiting_on_load": sum(1 for s in ok if s.load_s >= 0.5),
            "prompt_cache_share": f["prompt_tokens_cached"] / f["prompt_tokens"]
            if f["prompt_tokens"]
            else 0.0,
            "duration_s": self.sim_s,
            "wall_s": self.wall_s,
            "cpu_self_pct": self.cpu_self_pct,
            "cpu_nats_pct": self.cpu_nats_pct,
            "claim_timeouts": sum(n for k, n in self.warnings.items() if "no claim from" in k),
            "error_kinds": dict(Counter(_error_kind(s) for s in self.samples if not s.ok)),
        }

    def _per_run(self, n: int) -> int | float:
        return n if self.runs == 1 else n / self.runs

    def turns(self) -> list[dict[str, float]]:
        """Per turn index: mean prompt tokens, prompt eval seconds and TTFT (successful turns)."""
        by: dict[int, list[Sample]] = {}
        for s in self.ok:
            if s.turn >= 0:
                by.setdefault(s.turn, []).append(s)
        return [
            {
                "turn": t + 1,
                "n": len(v),
                "prompt_tokens": sum(s.prompt_eval_count for s in v) / len(v),
                "prompt_eval_s": sum(s.prompt_eval_s for s in v) / len(v),
                "ttft_s": sum(s.ttft for s in v) / len(v),
            }
            for t, v in sorted(by.items())
        ]


def pool(runs: Sequence[RunResult]) -> RunResult:
    """Repetitions of one workload under one policy as one result: every request, the summed
    durations and counters (`RunResult.summary` reports loads per run)."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    for i, r in enumerate(runs):
        for x in r.samples:
            x.run = i
    wall = sum(r.wall_s for r in runs)
    warnings: Counter[str] = Counter()
    for r in runs:
        warnings.update(r.warnings)
    return RunResult(
        workload=first.workload,
        policy=first.policy,
        samples=[x for r in runs for x in r.samples],
        wall_s=wall,
        scale=first.scale,
        fleet={k: sum(r.fleet[k] for r in runs) for k in first.fleet},
        agents={a: {k: sum(r.agents[a][k] for r in runs) for k in first.agents[a]} for a in first.agents},
        cpu_self_pct=sum(r.cpu_self_pct * r.wall_s for r in runs) / wall if wall > 0 else 0.0,
        cpu_nats_pct=sum(r.cpu_nats_pct * r.wall_s for r in runs) / wall if wall > 0 else 0.0,
        warnings=dict(warnings),
        runs=len(runs),
    )


def _error_kind(s: Sample) -> str:
    return f"HTTP {s.status}: {s.error}" if s.status and s.status != 200 else s.error


def _stats(fleet: LocalFleet) -> list[dict[str, int]]:
    return [{k: int(getattr(sim.stats, k)) for k in _COUNTERS} for sim in fleet.sims]


async def _wait_ready(fleet: LocalFleet, n: int, timeout: float = 15.0) -> None:
    """Until the gateway's fleet view lists all ``n`` agents, each with its models on disk."""
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    deadline = time.monotonic() + timeout
    while True:
        agents = view.agents()
        if len(agents) >= n and all(a.models for a in agents):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the gateway lists {len(agents)} of {n} agents after {timeout:.0f}s")
        await view.wait_changed(min(left, 0.5))


async def _prewarm(fleet: LocalFleet, models: Sequence[str], timeout: float = 60.0) -> None:
    """Load ``models`` on every simulator directly (Ollama's load-only request), then wait until the
    gateway's fleet view shows them loaded everywhere."""

    async def load(url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        for m in models:
            body = msgspec.json.encode({"model": m, "prompt": ""})
            status, reply = await fetch(HOST, port, post(HOST, port, "/api/generate", body), timeout)
            if status != 200:
                raise RuntimeError(f"loading {m} on {url}: HTTP {status} {reply[:200]!r}")

    await asyncio.gather(*(load(sim.url) for sim in fleet.sims))
    keys = [parse_name(m).key for m in models]
    assert fleet.gateway is not None
    view = fleet.gateway.fleet
    deadline = time.monotonic() + timeout
    while not all(len(view.loaded_on(k)) == len(fleet.sims) for k in keys):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"the gateway does not see {', '.join(models)} loaded everywhere")
        await view.wait_changed(min(left, 0.5))


def _seed_router(fleet: LocalFleet, seed: int) -> None:
    """Seed the gateway's `random` strategy, when its dispatcher keeps a `Router` we can replace."""
    dispatcher = getattr(fleet.gateway, "dispatcher", None)
    if dispatcher is not None and isinstance(getattr(dispatcher, "_router", None), Router):
        dispatcher._router = Router(seed=seed)


async def run_one(
    workload: str, policy: str, *, seed: int, time_scale: float, knobs: Knobs, cap: float = 150.0
) -> RunResult:
    """``workload`` under ``policy`` on a fresh fleet; ``cap`` bounds the workload in wall seconds."""
    scale = time_scale
    rng = random.Random(f"{seed}/{workload}")  # the same requests for every policy
    periods = scaled_periods(scale)
    options = FleetOptions(
        port=0,
        sims=fleet_sims(seed, scale),
        log_level="WARNING",
        agent=dict(periods.get(AgentSettings, {})),
        registry=dict(periods.get(RegistrySettings, {})),
        gateway=dict(periods.get(GatewaySettings, {})),
    )
    counter = LogCounter()
    logging.getLogger().addHandler(counter)
    fleet = LocalFleet(options)
    try:
        await fleet.start()
        await _wait_ready(fleet, len(MACHINES))
        _seed_router(fleet, seed)
        if workload == "chat":
            await _prewarm(fleet, [m for m, _ in CHAT_MODELS])
        port = int(fleet.url.rsplit(":", 1)[1])
        before = _stats(fleet)
        nats_pid = fleet.nats._proc.pid if fleet.nats is not None and fleet.nats._proc is not None else 0
        cpu0, nats0 = time.process_time(), cpu_seconds(nats_pid) if nats_pid else 0.0
        counter.counts.clear()
        if workload == "skewed":
            plans = plan_skewed(rng, knobs)
            samples, wall = await drive_closed(port, policy, scale, plans, knobs.skewed_concurrency, cap)
        elif workload == "chat":
            samples, wall = await drive_chats(port, policy, scale, plan_chats(rng, knobs), cap)
        elif workload == "burst":
            samples, wall = await drive_burst(port, policy, scale, plan_burst(rng, knobs), cap)
        elif workload == "num_ctx":
            plans = plan_num_ctx(rng, knobs)
            samples, wall = await drive_closed(port, policy, scale, plans, knobs.num_ctx_concurrency, cap)
        else:
            raise ValueError(f"unknown workload {workload!r}")
        cpu1, nats1 = time.process_time(), cpu_seconds(nats_pid) if nats_pid else 0.0
        after = _stats(fleet)
        warnings = dict(counter.counts)
    finally:
        logging.getLogger().removeHandler(counter)
        await fleet.stop()
    per_sim = [{k: a[k] - b[k] for k in _COUNTERS} for a, b in zip(after, before, strict=True)]
    total = {k: sum(d[k] for d in per_sim) for k in _COUNTERS}
    ids = [f"{m[0]}-{i}" for i, m in enumerate(MACHINES)]  # LocalFleet's agent ids
    agents = {
        i: {"requests": d["started"], "loads": d["loads"], "reloads": d["reloads"]}
        for i, d in zip(ids, per_sim, strict=True)
    }
    return RunResult(
        workload=workload,
        policy=policy,
        samples=samples,
        wall_s=wall,
        scale=scale,
        fleet=total,
        agents=agents,
        cpu_self_pct=(cpu1 - cpu0) / wall * 100 if wall > 0 else 0.0,
        cpu_nats_pct=(nats1 - nats0) / wall * 100 if wall > 0 else 0.0,
        warnings=warnings,
    )


# -- report ---------------------------------------------------------------------------------------
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    # (summary key, header, higher is better)
    ("ttft_p50_s", "TTFT p50 (s)", False),
    ("ttft_p95_s", "TTFT p95 (s)", False),
    ("e2e_p95_s", "e2e p95 (s)", False),
    ("tokens_per_s", "tokens/s", True),
    ("cold_loads", "cold loads", False),
    ("reloads", "reloads", False),
    ("evictions", "evictions", False),
    ("errors", "errors", False),
)


def ratio(a: float, b: float) -> float:
    if a != a or b != b or b == 0:  # NaN or no baseline
        return math.nan
    return a / b


def verdict(summaries: dict[str, dict[str, Any]]) -> str:
    """The issue's bar: auto beats every baseline present on TTFT p95 and tokens/s, with 0 errors."""
    auto = summaries.get("auto")
    bases = [b for b in BASELINES if b in summaries]
    if auto is None or not bases:
        return "verdict: needs auto and a baseline"
    parts = []
    passed = auto["errors"] == 0
    for b in bases:
        s = summaries[b]
        t_ok = auto["ttft_p95_s"] < s["ttft_p95_s"]
        r_ok = auto["tokens_per_s"] > s["tokens_per_s"]
        passed &= t_ok and r_ok
        parts.append(
            f"TTFT p95 {'<' if t_ok else '>='} {b} ({fmt(auto['ttft_p95_s'])} vs {fmt(s['ttft_p95_s'])} s), "
            f"tokens/s {'>' if r_ok else '<='} {b} ({fmt(auto['tokens_per_s'])} vs {fmt(s['tokens_per_s'])})"
        )
    parts.append(f"auto errors {auto['errors']}")
    return f"verdict: {'PASS' if passed else 'MISS'} — " + "; ".join(parts)


def workload_table(results: Sequence[RunResult]) -> tuple[str, dict[str, Any]]:
    summaries = {r.policy: r.summary() for r in results}
    header = ["policy", "requests", *(h for _, h, _ in COLUMNS)]
    rows: list[list[str]] = []
    for policy, s in summaries.items():
        cells = [policy, str(s["requests"])]
        for key, _, _ in COLUMNS:
            v = s[key]
            cells.append(str(v) if isinstance(v, int) else fmt(v))
        rows.append(cells)
    ratios: dict[str, dict[str, float]] = {}
    if "auto" in summaries:
        for b in BASELINES:
            if b not in summaries:
                continue
            rs = {
                key: ratio(float(summaries["auto"][key]), float(summaries[b][key])) for key, _, _ in COLUMNS
            }
            ratios[f"auto/{b}"] = rs
            rows.append(
                [f"auto ÷ {b}", ""]
                + [fmt(rs[key]) + ("x" if rs[key] == rs[key] else "") for key, _, _ in COLUMNS]
            )
    text = table(header, rows) + "\n" + verdict(summaries)
    return text, {"policies": summaries, "ratios": ratios, "verdict": verdict(summaries)}


def chat_table(results: Sequence[RunResult]) -> tuple[str, list[dict[str, Any]]]:
    """Mean prompt eval seconds per turn index, one column per policy, and the cache share."""
    turns = {r.policy: r.turns() for r in results}
    n = max((len(t) for t in turns.values()), default=0)
    header = ["turn", "prompt tokens", *(f"{p} prompt eval (s)" for p in turns)]
    rows = []
    out = []
    for i in range(n):
        first = next((t[i] for t in turns.values() if len(t) > i), None)
        row = [str(i + 1), fmt(first["prompt_tokens"], 0) if first else "—"]
        entry: dict[str, Any] = {"turn": i + 1, "prompt_tokens": first["prompt_tokens"] if first else None}
        for p, t in turns.items():
            v = t[i]["prompt_eval_s"] if len(t) > i else math.nan
            row.append(fmt(v, 3))
            entry[p] = v
        rows.append(row)
        out.append(entry)
    share = ["cached prompt tokens", ""] + [
        f"{r.summary()['prompt_cache_share'] * 100:.0f}%" for r in results
    ]
    rows.append(share)
    text = table(header, rows) + "\n" + cache_verdict(results)
    return text, out


def _mean_prompt_eval(r: RunResult, later: bool) -> float:
    """Mean prompt eval seconds of the first turns (``later`` False) or of all later turns."""
    v = [s.prompt_eval_s for s in r.ok if s.turn >= 0 and (s.turn > 0) == later]
    return sum(v) / len(v) if v else math.nan


def cache_verdict(results: Sequence[RunResult]) -> str:
    """The issue's bar for chats: under auto, later turns evaluate less prompt than the first turn
    (the history comes from the cache) and less than under each baseline present."""
    by = {r.policy: r for r in results}
    auto = by.get("auto")
    if auto is None:
        return "prompt cache: needs auto"
    first, later = _mean_prompt_eval(auto, False), _mean_prompt_eval(auto, True)
    passed = later < first
    parts = [f"auto: turn 1 {fmt(first, 3)} s, later turns {fmt(later, 3)} s"]
    for b in BASELINES:
        if b in by:
            bl = _mean_prompt_eval(by[b], True)
            passed &= later < bl
            parts.append(f"{b}: later turns {fmt(bl, 3)} s")
    return f"prompt cache: {'PASS' if passed else 'MISS'} — mean prompt eval " + "; ".join(parts)


def progress(r: RunResult) -> str:
    s = r.summary()
    spread = " ".join(f"{a}:{d['requests']}/{d['loads']}" for a, d in r.agents.items())
    warn = f" claim timeouts {s['claim_timeouts']}" if s["claim_timeouts"] else ""
    for kind, n in s["error_kinds"].items():
        warn += f"\n      {n} x {kind[:160]}"
    return (
        f"  {r.workload:<8} {r.policy:<16} {s['requests']:>4} req {s['errors']:>3} err "
        f"{r.wall_s:6.1f}s wall  cpu {r.cpu_self_pct:3.0f}% (+nats {r.cpu_nats_pct:.0f}%)"
        f"  requests/loads per agent: {spread}{warn}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="workload and simulator seed (default 1)")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {', '.join(WORKLOADS)} (default all)",
    )
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated strategies to compare (default {','.join(POLICIES)})",
    )
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each workload under each policy N times, each on a fresh fleet, and pool them: "
        "percentiles over all requests, loads per run (default 1)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=f"wall seconds per simulated second (default {DEFAULT_TIME_SCALE})",
    )
    p.add_argument(
        "--cap",
        type=float,
        default=150.0,
        help="wall seconds one workload may run under one policy before it is cut off (default 150)",
    )
    p.add_argument("--json", metavar="FILE", default=str(DEFAULT_JSON), help="write the figures here too")
    p.add_argument("--keep-logs", action="store_true", help="keep the fleet's warnings log")
    return p


def _split(value: str, valid: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise SystemExit(f"unknown {what}: {', '.join(bad) or '(none)'}; valid: {', '.join(valid)}")
    return items


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload under every policy; prints progress and the tables, returns the JSON data."""
    workloads = _split(args.workloads, WORKLOADS, "workload")
    policies = _split(args.policies, STRATEGIES, "policy")
    knobs = QUICK if args.quick else Knobs()
    data: dict[str, Any] = {
        "machine": machine(),
        "nproc": os.cpu_count(),
        "loop": loop_name(),
        "seed": args.seed,
        "time_scale": args.time_scale,
        "quick": bool(args.quick),
        "repeat": args.repeat,
        "knobs": knobs.__dict__,
        "scaled_periods": {cls.__name__: fields for cls, fields in scaled_periods(args.time_scale).items()},
        "fleet": [
            {"agent": f"{v}-{i}", "gpu": g, "vram_gb": vr, "speed": sp, "num_parallel": par}
            for i, (v, g, vr, sp, par) in enumerate(MACHINES)
        ],
        "workloads": {},
    }
    texts = []
    for w in workloads:
        results = []
        for p in policies:
            runs = []
            for _ in range(args.repeat):
                r = await run_one(w, p, seed=args.seed, time_scale=args.time_scale, knobs=knobs, cap=args.cap)
                print(progress(r), flush=True)
                runs.append(r)
            results.append(pool(runs))
        text, entry = workload_table(results)
        entry["agents"] = {r.policy: r.agents for r in results}
        entry["samples"] = {r.policy: [_sample_json(x) for x in r.samples] for r in results}
        entry["warnings"] = {r.policy: r.warnings for r in results}
        if w == "chat":
            ctext, turns = chat_table(results)
            text += "\n\nprompt eval per turn (mean over conversations, simulated seconds):\n" + ctext
            entry["turns"] = turns
            entry["cache_verdict"] = cache_verdict(results)
        texts.append(f"## {w}\n\n{text}")
        data["workloads"][w] = entry
    print()
    print("\n\n".join(texts))
    return data


async def amain(args: argparse.Namespace) -> int:
    knobs = QUICK if args.quick else Knobs()
    print(
        f"machine: {machine()}; {loop_name()}; seed {args.seed}; time_scale {args.time_scale:g} "
        f"(times below are simulated seconds); {len(MACHINES)} simulated servers; "
        f"{'quick' if args.quick else 'full'} counts {knobs}",
        flush=True,
    )
    t0 = time.perf_counter()
    data = await bench(args)
    data["wall_s"] = time.perf_counter() - t0
    data["command"] = " ".join(["python -m bench.routing", *sys.argv[1:]])
    print(f"\ntotal wall time {data['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, _finite(data))
        print(f"wrote {args.json}")
    return 0


def _sample_json(s: Sample) -> dict[str, Any]:
    """One request for the JSON file (times in simulated seconds, rounded to the millisecond)."""
    out: dict[str, Any] = {"model": s.model, "ok": s.ok, "t_start": round(s.t_start, 3)}
    if s.ok:
        out |= {
            "ttft": round(s.ttft, 3),
            "e2e": round(s.e2e, 3),
            "eval_count": s.eval_count,
            "prompt_eval_count": s.prompt_eval_count,
            "prompt_eval_s": round(s.prompt_eval_s, 3),
            "load_s": round(s.load_s, 3),
        }
    else:
        out["error"] = _error_kind(s)
    if s.num_ctx is not None:
        out["num_ctx"] = s.num_ctx
    if s.turn >= 0:
        out |= {"conv": s.conv, "turn": s.turn + 1}
    if s.run:
        out["run"] = s.run
    return out


def _finite(obj: Any) -> Any:
    """JSON has no NaN: None instead."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def main() -> int:
    args = parser().parse_args()
    _split(args.workloads, WORKLOADS, "workload")  # fail before anything starts
    _split(args.policies, STRATEGIES, "policy")
    if args.time_scale <= 0:
        print("--time-scale must be > 0 (times are measured on the wall clock)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    # the fleet runs in this process: its warnings go to a file (counted per run), not the tables
    logdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    handler = logging.FileHandler(logdir / "fleet.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        return run(amain(args))
    finally:
        handler.close()
        if args.keep_logs:
            print(f"fleet warnings: {logdir / 'fleet.log'}")
        else:
            with contextlib.suppress(OSError):
                (logdir / "fleet.log").unlink()
                logdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
