"""``corral aggregator``: merged views and rolling figures of the fleet, written to JetStream KV."""

from __future__ import annotations

import argparse
import logging

from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.runtime.metricsserver import metrics_served
from corral.runtime.process import service_main, wait_for_stop
from corral.runtime.settings import add_arguments

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral aggregator",
        description="Keep the fleet's merged views (tags, ps, /v1/models) and /api/status with "
        "requests/s, tokens/s and time to first token in the views KV bucket. Run one or more "
        "anywhere that reaches NATS; copies agree with each other.",
    )
    add_arguments(p, AggregatorSettings)
    return p


async def serve(settings: AggregatorSettings) -> int:
    agg = Aggregator(settings)
    await agg.start()
    try:  # a metrics port already taken still stops the aggregator cleanly
        async with metrics_served(agg.metrics.registry, settings.metrics_port):
            lost = await wait_for_stop(agg.lost)
    finally:
        await agg.stop()
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    return service_main(parser(), AggregatorSettings, argv, "aggregator", serve)


if __name__ == "__main__":
    raise SystemExit(main())
