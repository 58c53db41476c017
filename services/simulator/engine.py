"""Running one completion on a runner: admission, slot, prompt eval, decode, metrics
(as Ollama's server/sched.go and llm/server.go do it).

Rates: one stream decodes at ``decode_rate / size_gb`` tok/s (memory-bandwidth bound), scaled by
vendor and `speed`, slowed by partial offload; prompt eval is `prompt_factor` × faster. Concurrent
streams on one runner share bandwidth sub-linearly (aggregate ∝ n^0.6). A slot's cached prefix is
not re-evaluated, but `prompt_eval_count` reports the whole prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from corral.protocol.errors import CorralError
from corral.simulator.catalog import LocalModel
from corral.simulator.clock import Clock
from corral.simulator.config import SimConfig
from corral.simulator.scheduler import Runner, RunnerOptions, Scheduler, common_prefix
from corral.simulator.stats import SimStats
from corral.simulator.text import Plan, tokenize

CONTENT: Final = 0
THINKING: Final = 1
TOOL_CALLS: Final = 2
TOOL_CALL_TOKENS: Final = 8

#: emit(kind, text) writes one streamed chunk; kind is CONTENT, THINKING or TOOL_CALLS.
Emit = Callable[[int, str], Awaitable[None]]


class Job(msgspec.Struct, kw_only=True):
    model: LocalModel
    options: RunnerOptions
    keep_alive: float | None
    tokens: list[int]
    plan: Plan | None = None
    t0: float  # perf_counter() at handler start


class Outcome(msgspec.Struct, kw_only=True):
    load_ns: int = 0
    prompt_eval_count: int = 0
    prompt_eval_ns: int = 0
    eval_count: int = 0
    eval_ns: int = 0
    total_ns: int = 0
    context: list[int] = msgspec.field(default_factory=list)


def share(active: int) -> float:
    """Per-stream fraction of single-stream speed with `active` concurrent streams."""
    return 1.0 if active <= 1 else active**-0.4


class Engine:
    def __init__(self, config: SimConfig, clock: Clock, scheduler: Scheduler, stats: SimStats) -> None:
        self.config = config
        self.clock = clock
        self.scheduler = scheduler
        self.stats = stats

    def decode_rate(self, runner: Runner) -> float:
        """Single-stream decode tokens/s on this runner."""
        base = self.config.stream_rate(runner.model.config.size_gb)
        if runner.size > 0 and runner.size_vram < runner.size:
            cpu_fraction = 1.0 - runner.size_vram / runner.size
            base /= 1.0 + 12.0 * cpu_fraction
        return base

    def _ns(self, t0: float) -> int:
        """Simulated nanoseconds since perf_counter() value `t0`."""
        real = time.perf_counter() - t0
        return int((self.clock.simulated(real) if self.clock.scale > 0 else real) * 1e9)

    async def attach(self, job: Job) -> tuple[Runner, int]:
        """Acquire a runner (counted as a started request); returns it and load_duration in ns."""
        key = job.model.key
        self.stats.bump("started", model=key)
        try:
            runner = await self.scheduler.acquire(job.model, job.options, job.keep_alive)
        except asyncio.CancelledError:
            self.stats.bump("cancelled", model=key)
            raise
        except CorralError:
            self.stats.bump("failed", model=key)
            raise
        return runner, max(self._ns(job.t0), 1)

    def detach(self, job: Job, runner: Runner, *, cancelled: bool = False) -> None:
        self.scheduler.release(runner)
        self.stats.bump("cancelled" if cancelled else "finished", model=job.model.key)

    async def run(self, job: Job, emit: Emit | None) -> Outcome:
        """The whole request: attach, slot, prompt eval, decode (emitting chunks), detach."""
        runner, load_ns = await self.attach(job)
        try:
            out = await self._complete(runner, job, emit)
        except (asyncio.CancelledError, ConnectionError):
            self.detach(job, runner, cancelled=True)
            raise
        except BaseException:
            self.detach(job, runner)
            raise
        self.detach(job, runner)
        out.load_ns = load_ns
        out.total_ns += load_ns + out.prompt_eval_ns + out.eval_ns
        return out

    async def _complete(self, runner: Runner, job: Job, emit: Emit | None) -> Outcome:
        plan = job.plan
        assert plan is not None
        tokens = job.tokens
        t_wait = time.perf_counter()
        slot = await runner.acquire_slot(tokens)
        wait_ns = self._ns(t_wait)
        generated: list[str] = []
        try:
            cached = common_prefix(slot.cached, tokens)
            if cached >= len(tokens):
                cached = max(0, len(tokens) - 1)  # the last prompt token is always evaluated
            todo = len(tokens) - cached
            self.stats.bump("prompt_tokens", len(tokens))
            self.stats.bump("prompt_tokens_evaluated", todo)
            self.stats.bump("prompt_tokens_cached", cached)
            slot.cached = tokens
            runner.active += 1
            try:
                rate = self.decode_rate(runner)
                prompt_s = todo / (rate * self.config.prompt_factor * share(runner.active))
                await self.clock.sleep(prompt_s)
                eval_s = 0.0
                if emit is None:
                    n = plan.eval_count
                    eval_s = n / (rate * share(runner.active))
                    await self.clock.sleep(eval_s)
                    generated = plan.content
                else:
                    for kind, pieces in ((THINKING, plan.thinking), (CONTENT, plan.content)):
                        for piece in pieces:
                            d = 1.0 / (rate * share(runner.active))
                            eval_s += d
                            await self.clock.sleep(d)
                            await emit(kind, piece)
                            if kind == CONTENT:
                                generated.append(piece)
                    if plan.tool_calls:
                        d = TOOL_CALL_TOKENS * len(plan.tool_calls) / (rate * share(runner.active))
                        eval_s += d
                        await self.clock.sleep(d)
                        await emit(TOOL_CALLS, "")
            finally:
                runner.active -= 1
                if generated:
                    slot.cached = tokens + tokenize("".join(generated))
        finally:
            runner.release_slot(slot)
        self.stats.bump("generated_tokens", plan.eval_count)
        return Outcome(
            prompt_eval_count=len(tokens),
            prompt_eval_ns=max(1, int(prompt_s * 1e9)),
            eval_count=plan.eval_count,
            eval_ns=int(eval_s * 1e9),
            context=tokens + tokenize("".join(plan.content)),
            total_ns=wait_ns,  # completed by run(): + load + prompt eval + decode
        )

    async def embed(self, job: Job, n_tokens: int) -> tuple[Outcome, Runner]:
        """Attach, take the (single) slot for the prompt-eval time of `n_tokens`, detach."""
        runner, load_ns = await self.attach(job)
        try:
            slot = await runner.acquire_slot([])
            try:
                runner.active += 1
                try:
                    secs = n_tokens / (self.decode_rate(runner) * self.config.prompt_factor)
                    await self.clock.sleep(secs)
                finally:
                    runner.active -= 1
            finally:
                runner.release_slot(slot)
        except (asyncio.CancelledError, ConnectionError):
            self.detach(job, runner, cancelled=True)
            raise
        self.detach(job, runner)
        self.stats.bump("prompt_tokens", n_tokens)
        self.stats.bump("prompt_tokens_evaluated", n_tokens)
        out = Outcome(load_ns=load_ns, prompt_eval_count=n_tokens, prompt_eval_ns=max(1, int(secs * 1e9)))
        out.total_ns = load_ns + out.prompt_eval_ns
        return out, runner
