"""The workloads, as objects: each plans its requests from a seeded generator (`Workload.plan`, pure)
and drives them through the gateway (`Workload.drive`), returning what each request measured and
the wall seconds it took. `WORKLOADS` lists them by name, in the order the benchmark runs them."""

from __future__ import annotations

import asyncio
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from bench.routing.client import Client, Clients, Sample
from bench.routing.fleet import BIG_MODEL, CONTEXT_LENGTH

P = TypeVar("P")


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
    steady_clients: int = 12


QUICK = Knobs(
    skewed_requests=36,
    skewed_concurrency=6,
    chats=4,
    chat_turns=3,
    burst=12,
    num_ctx_requests=24,
    num_ctx_concurrency=4,
    steady_clients=6,
)


class Workload(ABC, Generic[P]):
    """One workload: its planned requests depend only on the generator and the knobs."""

    name: ClassVar[str]
    per_turn: ClassVar[bool] = False  # the report adds the prompt eval per conversation turn
    # models loaded on every server before the clock starts (the fresh fleet's starting state)
    preload: ClassVar[tuple[str, ...]] = ()
    # OLLAMA_CONTEXT_LENGTH on every server: the larger, the larger each runner (its KV cache)
    context_length: ClassVar[int] = CONTEXT_LENGTH
    # the model whose requests the workload is about: their TTFT is reported apart as well
    focus: ClassVar[str | None] = None

    @abstractmethod
    def plan(self, rng: random.Random, knobs: Knobs) -> list[P]: ...

    @abstractmethod
    async def drive(
        self, clients: Clients, plans: Sequence[P], knobs: Knobs, cap: float
    ) -> tuple[list[Sample], float]:
        """Send ``plans``; returns one sample per request sent and the wall seconds taken."""


# -- one-shot requests --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    """One request of an open or closed loop workload."""

    path: str
    body: dict[str, Any]
    model: str
    num_ctx: int | None = None


class ClosedLoop(Workload[Planned]):
    """``concurrency`` clients take the planned requests in order, each sending its next as soon as
    its last one finished."""

    @abstractmethod
    def concurrency(self, knobs: Knobs) -> int: ...

    async def drive(
        self, clients: Clients, plans: Sequence[Planned], knobs: Knobs, cap: float
    ) -> tuple[list[Sample], float]:
        opened = await clients.open(self.concurrency(knobs))
        samples: list[Sample] = []
        todo: Iterator[Planned] = iter(plans)

        async def worker(c: Client) -> None:
            for p in todo:
                s = Sample(model=p.model, num_ctx=p.num_ctx)
                samples.append(s)
                await c.send(p.path, p.body, s)

        wall = await clients.timed(asyncio.gather(*(worker(c) for c in opened)), samples, cap)
        return samples, wall


SKEWED_MODELS = ("llama3.2:3b", "qwen3:8b", "mistral:7b", "gemma3:4b", "llama3.2:1b", "deepseek-r1:7b")
ZIPF_S = 1.2


class Skewed(ClosedLoop):
    """Streaming generates over `SKEWED_MODELS` with Zipf-like popularity."""

    name = "skewed"

    def plan(self, rng: random.Random, knobs: Knobs) -> list[Planned]:
        weights = zipf_weights(len(SKEWED_MODELS))
        out = []
        for _ in range(knobs.skewed_requests):
            model = rng.choices(SKEWED_MODELS, weights=weights)[0]
            out.append(streamed(rng, model, (50, 800), (24, 160)))
        return out

    def concurrency(self, knobs: Knobs) -> int:
        return knobs.skewed_concurrency


NUM_CTX_MODELS = ("gemma3:4b", "llama3.2:3b")
# (num_ctx or None for the server default, weight, prompt tokens range)
NUM_CTX_CHOICES: tuple[tuple[int | None, int, tuple[int, int]], ...] = (
    (None, 2, (200, 2500)),
    (2048, 1, (100, 1500)),
    (8192, 1, (2500, 6000)),
)


class NumCtx(ClosedLoop):
    """Streaming generates asking for different context sizes (``options.num_ctx``)."""

    name = "num_ctx"

    def plan(self, rng: random.Random, knobs: Knobs) -> list[Planned]:
        weights = [w for _, w, _ in NUM_CTX_CHOICES]
        out = []
        for _ in range(knobs.num_ctx_requests):
            model = rng.choice(NUM_CTX_MODELS)
            num_ctx, _, (lo, hi) = rng.choices(NUM_CTX_CHOICES, weights=weights)[0]
            options: dict[str, Any] = {"num_predict": rng.randint(24, 128)}
            if num_ctx is not None:
                options["num_ctx"] = num_ctx
            prompt = words(rng, rng.randint(lo, hi))
            body = {"model": model, "prompt": prompt, "stream": True, "options": options}
            out.append(Planned("/api/generate", body, model, num_ctx))
        return out

    def concurrency(self, knobs: Knobs) -> int:
        return knobs.num_ctx_concurrency


class Burst(Workload[Planned]):
    """Every request at once, each on its own connection, for a model no agent has loaded."""

    name = "burst"

    def plan(self, rng: random.Random, knobs: Knobs) -> list[Planned]:
        return [streamed(rng, BIG_MODEL, (50, 400), (24, 96)) for _ in range(knobs.burst)]

    async def drive(
        self, clients: Clients, plans: Sequence[Planned], knobs: Knobs, cap: float
    ) -> tuple[list[Sample], float]:
        opened = await clients.open(len(plans))
        samples = [Sample(model=p.model, num_ctx=p.num_ctx) for p in plans]
        sends = (c.send(p.path, p.body, s) for c, p, s in zip(opened, plans, samples, strict=True))
        wall = await clients.timed(asyncio.gather(*sends), samples, cap)
        return samples, wall


STEADY_MODEL = "llama3.2:3b"
STEADY_LEAD_S = 5.0  # simulated seconds of steady traffic before the burst, so the agents report it


class SteadyBurst(Workload[Planned]):
    """The cold `Burst` beside steady traffic: `STEADY_MODEL` is loaded everywhere and
    ``steady_clients`` closed loops stream on it; after `STEADY_LEAD_S` every burst request for
    `BIG_MODEL` goes at once. The steady loops stop when the burst is answered. A policy that sizes
    the load by the file alone can evict the busy model or load the cold one partly on the CPU."""

    name = "steady_burst"
    preload = (STEADY_MODEL,)
    focus = BIG_MODEL
    context_length = 8192

    def plan(self, rng: random.Random, knobs: Knobs) -> list[Planned]:
        burst = [streamed(rng, BIG_MODEL, (50, 400), (24, 96)) for _ in range(knobs.burst)]
        steady = [streamed(rng, STEADY_MODEL, (50, 400), (24, 160)) for _ in range(4 * knobs.burst)]
        return burst + steady

    async def drive(
        self, clients: Clients, plans: Sequence[Planned], knobs: Knobs, cap: float
    ) -> tuple[list[Sample], float]:
        burst = [p for p in plans if p.model == BIG_MODEL]
        steady = [p for p in plans if p.model != BIG_MODEL]
        opened = await clients.open(len(burst) + knobs.steady_clients)
        samples: list[Sample] = []
        burst_done = asyncio.Event()
        todo: Iterator[Planned] = itertools.cycle(steady)

        async def loop(c: Client) -> None:
            while not burst_done.is_set():
                p = next(todo)
                s = Sample(model=p.model, num_ctx=p.num_ctx)
                samples.append(s)
                await c.send(p.path, p.body, s)

        async def send_burst() -> None:
            await asyncio.sleep(STEADY_LEAD_S * clients.scale)  # the planned lead on the simulated clock
            burst_samples = [Sample(model=p.model, num_ctx=p.num_ctx) for p in burst]
            samples.extend(burst_samples)
            try:
                pairs = zip(opened[: len(burst)], burst, burst_samples, strict=True)
                sends = (c.send(p.path, p.body, s) for c, p, s in pairs)
                await asyncio.gather(*sends)
            finally:
                burst_done.set()

        loops = (loop(c) for c in opened[len(burst) :])
        wall = await clients.timed(asyncio.gather(send_burst(), *loops), samples, cap)
        return samples, wall


# -- conversations ------------------------------------------------------------------------------------
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


CHAT_MODELS = (("mistral:7b", 2), ("llama3.2:3b", 1))  # (model, weight)


class Chat(Workload[Conversation]):
    """Multi-turn conversations, each turn resending the whole history; both models loaded on
    every server first, so where the turns go alone decides whether a prompt cache is reused."""

    name = "chat"
    per_turn = True
    preload = tuple(m for m, _ in CHAT_MODELS)

    def plan(self, rng: random.Random, knobs: Knobs) -> list[Conversation]:
        models = [m for m, _ in CHAT_MODELS]
        weights = [w for _, w in CHAT_MODELS]
        out = []
        for _ in range(knobs.chats):
            turns = tuple(
                Turn(
                    user=words(rng, rng.randint(60, 220)),
                    num_predict=rng.randint(60, 160),
                    think_s=0.0 if t == 0 else min(rng.expovariate(1 / 4.0), 12.0),
                )
                for t in range(knobs.chat_turns)
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

    async def drive(
        self, clients: Clients, plans: Sequence[Conversation], knobs: Knobs, cap: float
    ) -> tuple[list[Sample], float]:
        """One closed loop per conversation: wait the think time, send the whole history plus the
        new user message, append the reply, repeat. A failed turn ends its conversation."""
        opened = await clients.open(len(plans))
        samples: list[Sample] = []
        scale = clients.scale

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

        talks = (talk(i, conv, c) for i, (conv, c) in enumerate(zip(plans, opened, strict=True)))
        wall = await clients.timed(asyncio.gather(*talks), samples, cap)
        return samples, wall


WORKLOADS: dict[str, Workload[Any]] = {
    w.name: w for w in (Skewed(), Chat(), Burst(), SteadyBurst(), NumCtx())
}


# -- text and draws -----------------------------------------------------------------------------------
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


def words(rng: random.Random, n: int) -> str:
    """``n`` tokens of text for the simulator's tokenizer (one word = one token)."""
    return " ".join(rng.choices(_VOCAB, k=n))


def zipf_weights(n: int, s: float = ZIPF_S) -> list[float]:
    raw = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def streamed(
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
