"""The aggregator's settings: one field per setting, read from ``CORRAL_*`` and flags."""

from __future__ import annotations

from corral.runtime.settings import CommonSettings


class AggregatorSettings(CommonSettings, frozen=True, kw_only=True):
    stats_window_s: float = 60.0  # rates in /api/status cover this many seconds
    views_interval_s: float = 1.0  # how often status (and its rates) is rewritten
