"""``corral aggregator``: merged views and rolling figures of the fleet, written to JetStream KV."""

from __future__ import annotations

import argparse
import logging

from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.runtime.logs import setup_logging
from corral.runtime.process import add_common_arguments, overrides, run, wait_for_signal
from corral.runtime.settings import load_settings

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corral aggregator",
        description="Keep the fleet's merged views (tags, ps, /v1/models) and /api/status with "
        "requests/s, tokens/s and time to first token in the views KV bucket. Run one or more "
        "anywhere that reaches NATS; copies agree with each other.",
    )
    p.add_argument("--window", dest="stats_window_s", type=float, help="seconds the rates cover (default 60)")
    p.add_argument(
        "--interval", dest="views_interval_s", type=float, help="seconds between status rewrites (default 1)"
    )
    add_common_arguments(p)
    return p


async def serve(settings: AggregatorSettings) -> int:
    agg = Aggregator(settings)
    await agg.start()
    try:
        await wait_for_signal()
    finally:
        await agg.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = load_settings(AggregatorSettings, overrides(args, "stats_window_s", "views_interval_s"))
    setup_logging(settings.log_level, service="aggregator")
    return run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
