"""The aggregator's settings: each declared once (type, default, doc); flags and env vars derive from it."""

from __future__ import annotations

from typing import Annotated

from corral.runtime.settings import CommonSettings, setting


class AggregatorSettings(CommonSettings, frozen=True, kw_only=True):
    stats_window_s: Annotated[
        float, setting("the window of the rates in /api/status", gt=0, flags=["--window"])
    ] = 60.0
    views_interval_s: Annotated[
        float,
        setting(
            "how often status is rewritten (views also on fleet changes, at most every 0.5 s)",
            gt=0,
            flags=["--interval"],
        ),
    ] = 1.0
    metrics_port: Annotated[
        int,
        setting(
            "serve Prometheus /metrics (every agent's finished requests) on this port; 0 = off",
            ge=0,
            le=65535,
            shown="0 (off)",
        ),
    ] = 0
