"""Pure routing models over fleet snapshots: the cost model, the strategies, the pull placement rule.
No I/O, no clocks, no NATS: only `corral.protocol` types go in and out.

`corral.routing.model` holds the cost model and the strategies (`Router`), `corral.routing.pulls`
the rule for where a pull goes (`pull_order`)."""

from corral.routing.model import (
    CONTEXT_SWITCH_S,
    DEFAULT_MODEL_SIZE,
    DEFAULT_STRATEGY,
    EVICTION_S,
    LOAD_BANDWIDTH,
    LOAD_OVERHEAD_S,
    LOADING_REMAINING,
    PROMPT_EVAL_S,
    SESSION_MAX_EXTRA_WAIT_S,
    SESSION_REPLAY_S,
    STRATEGIES,
    TYPICAL_REQUEST_S,
    Route,
    Router,
    effective_ctx,
    estimate_ttft,
    estimate_wait,
    fits,
    load,
    load_time,
    loading_for,
    parse_strategy,
    runner_matches,
    wanted_ctx,
    warm,
)
from corral.routing.pulls import has_model, pull_order

__all__ = [
    "CONTEXT_SWITCH_S",
    "DEFAULT_MODEL_SIZE",
    "DEFAULT_STRATEGY",
    "EVICTION_S",
    "LOADING_REMAINING",
    "LOAD_BANDWIDTH",
    "LOAD_OVERHEAD_S",
    "PROMPT_EVAL_S",
    "SESSION_MAX_EXTRA_WAIT_S",
    "SESSION_REPLAY_S",
    "STRATEGIES",
    "TYPICAL_REQUEST_S",
    "Route",
    "Router",
    "effective_ctx",
    "estimate_ttft",
    "estimate_wait",
    "fits",
    "has_model",
    "load",
    "load_time",
    "loading_for",
    "parse_strategy",
    "pull_order",
    "runner_matches",
    "wanted_ctx",
    "warm",
]
