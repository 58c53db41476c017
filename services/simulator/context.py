"""Everything one simulator instance owns, handed to the route handlers (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass

from services.simulator.catalog import Catalog
from services.simulator.clock import Clock
from services.simulator.config import SimConfig
from services.simulator.durations import CreatedAt
from services.simulator.engine import Engine
from services.simulator.scheduler import Scheduler
from services.simulator.stats import SimStats


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
