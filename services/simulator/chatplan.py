"""What Ollama's chat handler does before it runs a chat, shared by every route that ends in it
(`/api/chat`, and the Anthropic and Responses middlewares in front of it): a model loaded and
nothing run for no messages (`load_only`), the prompt cut to the context as the runner cuts it
(`fit_context`), and the chat's prompt and reply planned (`plan_chat`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from corral.protocol.errors import CorralError
from corral.simulator.catalog import LocalModel
from corral.simulator.context import SimContext
from corral.simulator.engine import Engine, Job
from corral.simulator.text import Plan, plan_reply, render_chat, rendered, seed_for
from corral.simulator.wire import sampling_of


def fit_context(tokens: list[int], num_ctx: int, opts: Mapping[str, Any]) -> list[int]:
    """A prompt longer than the context as Ollama's runner cuts it: the first ``num_keep`` tokens
    (option, 4 by default) kept, then as many of the last as fit, so ``prompt_eval_count`` is at
    most ``num_ctx`` and a huge prompt costs no more prompt evaluation than a full context."""
    if len(tokens) <= num_ctx:
        return tokens
    keep = max(0, min(int(opts.get("num_keep", 4)), num_ctx - 1))
    return tokens[:keep] + tokens[len(tokens) - (num_ctx - keep) :]


async def load_only(engine: Engine, job: Job) -> CorralError | None:
    """The reply to no prompt or no messages: the model loaded (or kept) and nothing run; the
    error that stopped the load, if one did."""
    try:
        runner, _ = await engine.attach(job)
    except CorralError as e:
        return e
    engine.detach(job, runner)
    return None


async def plan_chat(
    ctx: SimContext,
    request: web.Request,
    job: Job,
    model: LocalModel,
    turns: list[tuple[str, str]],
    tools: Sequence[Any],
    opts: dict[str, Any],
    *,
    think: bool,
    fmt: Any = None,
) -> Plan:
    """The chat's prompt as the model's runner gets it (its system prompt first, cut to the
    context) and its reply's plan, as Ollama's chat handler makes them; ``turns`` is not empty."""
    if model.system and turns[0][0] != "system":
        turns.insert(0, ("system", model.system))
    sampling = sampling_of(opts)
    tokens = await rendered(request.content_length, render_chat, turns, tools)
    job.tokens = fit_context(tokens, job.options.num_ctx, opts)
    job.plan = plan_reply(
        seed_for(ctx.config.seed if sampling.seed is None else sampling.seed, job.tokens),
        length=ctx.config.reply_tokens,
        num_predict=sampling.num_predict,
        think=think,
        tools=tools,
        last_user=turns[-1][1],
        last_role=turns[-1][0],
        fmt=fmt,
        stop=sampling.stop,
    )
    return job.plan
