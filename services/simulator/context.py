"""Everything one simulator instance owns, handed to the route handlers (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass

from corral.simulator.catalog import Catalog
from corral.simulator.clock import Clock
from corral.simulator.config import SimConfig
from corral.simulator.durations import CreatedAt
from corral.simulator.engine import Engine
from corral.simulator.scheduler import Scheduler
from corral.simulator.stats import SimStats


@dataclass
class SimContext:
    config: SimConfig
    clock: Clock
    stats: SimStats
    catalog: Catalog
    scheduler: Scheduler
    engine: Engine
    created_at: CreatedAt

    @classmethod
    def build(cls, config: SimConfig) -> SimContext:
        clock = Clock(config.time_scale)
        stats = SimStats()
        scheduler = Scheduler(config, clock, stats)
        return cls(
            config=config,
            clock=clock,
            stats=stats,
            catalog=Catalog(config),
            scheduler=scheduler,
            engine=Engine(config, clock, scheduler, stats),
            created_at=CreatedAt(),
        )
