"""ollama-sim: an Ollama-API server that behaves like a GPU box (models, VRAM, load times, slots,
prompt cache, keep_alive, Ollama's eviction and queue rules, pull progress).

    from corral.simulator import SimConfig, SimServer, load_config

    async with SimServer(load_config("sim.toml", time_scale=0.01), port=0) as sim:
        ...  # sim.url, sim.stats, sim.scheduler
"""

from corral.simulator.config import ConfigError, GpuConfig, ModelConfig, SimConfig, load_config
from corral.simulator.server import SimServer
from corral.simulator.stats import ModelStats, SimStats

__all__ = [
    "ConfigError",
    "GpuConfig",
    "ModelConfig",
    "ModelStats",
    "SimConfig",
    "SimServer",
    "SimStats",
    "load_config",
]
