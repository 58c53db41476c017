"""``corral registry``: fleet membership and fleet-wide model pulls."""

from __future__ import annotations

import argparse
import logging

from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.logs import setup_logging
from corral.runtime.process import add_common_arguments, overrides, run, wait_for_signal
from corral.runtime.settings import load_settings

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corral registry",
        description="Watch the fleet: announce agents that join, leave or die (missed heartbeats) "
        "on the events subjects and remove dead ones, and run fleet-wide pulls with merged "
        "progress. Several copies may run at once.",
    )
    p.add_argument(
        "--dead-after",
        dest="dead_after_s",
        type=float,
        help="seconds of silence after which an agent is dead (default: three of its heartbeats)",
    )
    add_common_arguments(p)
    return p


async def serve(settings: RegistrySettings) -> int:
    registry = Registry(settings)
    await registry.start()
    try:
        await wait_for_signal()
    finally:
        await registry.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = load_settings(RegistrySettings, overrides(args, "dead_after_s"))
    setup_logging(settings.log_level, service="registry")
    return run(serve(settings))


if __name__ == "__main__":
    raise SystemExit(main())
