"""What an agent alone knows, for Prometheus (``--metrics-port``): its slots per model (busy, free,
waiting here) and the loads and evictions it sees in its Ollama's ``/api/ps``. The fleet-wide view
of VRAM and slots is every gateway's ``/metrics``; these are the numbers no gateway sees.

`LoadBook` is pure: it is given each ``/api/ps`` reading and counts what changed. A model that
appears was loaded — for one of this agent's requests (``request``) or by someone else (``other``:
a client of that Ollama, a preload); one whose runner's context changed was reloaded (``reload``).
A model that disappears was evicted: its ``keep_alive`` ran out (``expired``), it made room for a
model loaded in the same reading (``replaced``), or it was unloaded (``unloaded``: ``keep_alive:
0``, ``ollama stop``). The first reading is the baseline: what was loaded before the agent began
is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from corral.agent.runners import expires_ts, token_of
from corral.protocol.messages import PsModel
from corral.protocol.names import decode_token, encode_token, key_of
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from corral.agent.agent import Agent

EXPIRY_SLACK_S = 1.0  # a model gone within this of its expiry counts as expired


class LoadBook:
    """Loads and evictions of one agent's Ollama, by model and reason, from its /api/ps readings."""

    def __init__(self) -> None:
        self.loads: dict[tuple[str, str], int] = {}  # (model key, reason) → count
        self.evictions: dict[tuple[str, str], int] = {}
        self._seen: dict[str, tuple[int, str]] | None = None  # model key → (context, expires_at)

    def observe(self, loaded: Sequence[PsModel], ours: Collection[str], now: float | None = None) -> None:
        """One reading of /api/ps; ``ours``: tokens of the models this agent has requests for now or
        has had one answered on since they were last read unloaded."""
        now = time.time() if now is None else now
        current = {k: (m.context_length, m.expires_at) for m in loaded if (k := key_of(m.name)) is not None}
        before, self._seen = self._seen, current
        if before is None:
            return
        new = [k for k in current if k not in before]
        for key in new:
            self._count(self.loads, key, "request" if encode_token(key) in ours else "other")
        for key, (ctx, _) in current.items():
            if key in before and before[key][0] != ctx and ctx and before[key][0]:
                self._count(self.loads, key, "reload")
                self._count(self.evictions, key, "reload")
        for key, (_, expires_at) in before.items():
            if key in current:
                continue
            expiry = expires_ts(expires_at)
            if expiry is not None and expiry <= now + EXPIRY_SLACK_S:
                reason = "expired"
            else:
                reason = "replaced" if new else "unloaded"
            self._count(self.evictions, key, reason)

    @staticmethod
    def _count(book: dict[tuple[str, str], int], key: str, reason: str) -> None:
        book[key, reason] = book.get((key, reason), 0) + 1


def agent_families(agents: Iterable[Agent]) -> list[Metric]:
    """The series of the agents of this process, read from their state machines now."""
    labels = ["agent", "model"]
    busy = GaugeMetricFamily("corral_agent_slots_busy", "Slots running a request, per model", labels=labels)
    free = GaugeMetricFamily("corral_agent_slots_free", "Slots free, per loaded model", labels=labels)
    waiting = GaugeMetricFamily(
        "corral_agent_slots_waiting", "Requests waiting here for a slot, per model", labels=labels
    )
    loads = CounterMetricFamily(
        "corral_agent_model_loads", "Models its Ollama loaded, by reason", labels=[*labels, "reason"]
    )
    evictions = CounterMetricFamily(
        "corral_agent_model_evictions", "Models its Ollama let go, by reason", labels=[*labels, "reason"]
    )
    for agent in agents:
        slots = agent.slots
        tokens = {t for m in agent.runners.loaded if (t := token_of(m.name)) is not None}
        tokens |= slots.busy_tokens()
        for token in sorted(tokens):
            model = decode_token(token)
            busy.add_metric([agent.id, model], slots.busy(token))
            free.add_metric([agent.id, model], max(slots.free(token), 0))
            waiting.add_metric([agent.id, model], slots.waiting(token))
        for (model, reason), n in sorted(agent.loads.loads.items()):
            loads.add_metric([agent.id, model, reason], n)
        for (model, reason), n in sorted(agent.loads.evictions.items()):
            evictions.add_metric([agent.id, model, reason], n)
    return [busy, free, waiting, loads, evictions]


class AgentCollector(Collector):
    """The agents ``agents()`` returns at each scrape."""

    def __init__(self, agents: Callable[[], Iterable[Agent]]) -> None:
        self._agents = agents

    def collect(self) -> Iterator[Metric]:
        yield from agent_families(self._agents())


def registry_for(agents: Callable[[], Iterable[Agent]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agents))
    return registry
