"""``corral registry``: fleet membership and fleet-wide model pulls."""

from __future__ import annotations

import argparse
import logging

from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.runtime.process import service_main, wait_for_stop
from corral.runtime.settings import add_arguments

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral registry",
        description="Watch the fleet: announce agents that join, leave or die (missed heartbeats) "
        "on the events subjects and remove dead ones, and run fleet-wide pulls with merged "
        "progress. Several copies may run at once.",
    )
    add_arguments(p, RegistrySettings)
    return p


async def serve(settings: RegistrySettings) -> int:
    registry = Registry(settings)
    await registry.start()
    try:
        lost = await wait_for_stop(registry.lost)
    finally:
        await registry.stop()
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    return service_main(parser(), RegistrySettings, argv, "registry", serve)


if __name__ == "__main__":
    raise SystemExit(main())
