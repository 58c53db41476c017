"""The fleet's gauges, computed at scrape time from the shared state: the agents' states (their KV
bucket, as every gateway watches it) and the fleet-wide queue's depths. Pure: no I/O, so every
gateway given the same state reports the same values, and nothing is counted twice across
gateways. Agents report slots per model, not requests per model: each agent's own ``/metrics``
(`corral.agent.metrics`) has its busy and free slots per model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import get_args

from corral.protocol.messages import AgentState, AgentStatus
from corral.protocol.names import key_of
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STATUSES = get_args(AgentStatus)


def fleet_families(agents: Sequence[AgentState], queue: Mapping[str, int]) -> list[Metric]:
    """``agents``: the live agents' states; ``queue``: model key → requests in the fleet-wide queue."""
    by_status = GaugeMetricFamily("corral_fleet_agents", "Live agents by status", labels=["status"])
    for status in STATUSES:
        by_status.add_metric([status], sum(1 for a in agents if a.status == status))
    vram_total = GaugeMetricFamily(
        "corral_fleet_gpu_vram_total_bytes", "VRAM of each GPU of each agent", labels=["agent", "gpu"]
    )
    vram_used = GaugeMetricFamily(
        "corral_fleet_gpu_vram_used_bytes", "VRAM in use on each GPU of each agent", labels=["agent", "gpu"]
    )
    slots = GaugeMetricFamily(
        "corral_fleet_slots",
        "Slots of each loaded model on each agent (its parallel)",
        labels=["agent", "model"],
    )
    model_vram = GaugeMetricFamily(
        "corral_fleet_model_vram_bytes",
        "VRAM each loaded model takes on each agent",
        labels=["agent", "model"],
    )
    in_flight = GaugeMetricFamily(
        "corral_fleet_agent_in_flight", "Requests each agent is running now", labels=["agent"]
    )
    free = GaugeMetricFamily(
        "corral_fleet_agent_free_slots", "Slots of loaded models each agent has free now", labels=["agent"]
    )
    waiting = GaugeMetricFamily(
        "corral_fleet_agent_queued", "Requests waiting at each agent for a slot", labels=["agent"]
    )
    for a in sorted(agents, key=lambda a: a.id):
        for g in a.gpus:
            vram_total.add_metric([a.id, str(g.index)], g.vram_total)
            vram_used.add_metric([a.id, str(g.index)], max(g.vram_total - g.vram_free, 0))
        sizes: dict[str, int] = {}
        for m in a.loaded:
            if (loaded := key_of(m.name)) is not None:
                sizes[loaded] = sizes.get(loaded, 0) + m.size_vram
        keys = sorted(sizes)
        for key in keys:
            slots.add_metric([a.id, key], a.parallel)
            model_vram.add_metric([a.id, key], sizes[key])
        in_flight.add_metric([a.id], a.in_flight)
        free.add_metric([a.id], max(len(keys) * a.parallel - a.in_flight, 0))
        waiting.add_metric([a.id], a.queued)
    depth = GaugeMetricFamily(
        "corral_fleet_queue_depth", "Requests waiting in the fleet-wide queue per model", labels=["model"]
    )
    for key, n in sorted(queue.items()):
        depth.add_metric([key], n)
    return [by_status, vram_total, vram_used, slots, model_vram, in_flight, free, waiting, depth]


class FleetCollector(Collector):
    """One scrape's fleet gauges over a snapshot of the fleet."""

    def __init__(self, agents: Sequence[AgentState], queue: Mapping[str, int]) -> None:
        self._agents = agents
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        yield from fleet_families(self._agents, self._queue)
