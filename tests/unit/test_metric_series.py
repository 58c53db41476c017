"""The pure parts of /metrics: the fleet's gauges from agent states, an agent's load book, labels."""

from __future__ import annotations

from corral.agent.metrics import LoadBook
from corral.gateway.fleetmetrics import fleet_families
from corral.gateway.metrics import Decision, endpoint_label, streamed
from corral.protocol.messages import AgentState, Gpu, PsModel
from corral.protocol.names import encode_token
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

GIB = 1 << 30


def _ps(name: str, ctx: int = 4096, expires_at: str = "2318-01-01T00:00:00Z") -> PsModel:
    return PsModel(
        name=name, model=name, size=GIB, digest="d", expires_at=expires_at, size_vram=GIB, context_length=ctx
    )


def _agent(agent_id: str, *, status: str = "active", in_flight: int = 0) -> AgentState:
    return AgentState(
        id=agent_id,
        vendor="nvidia",
        host="h",
        ollama_url="http://x",
        status=status,  # type: ignore[arg-type]
        gpus=(Gpu(index=0, name="g", vendor="nvidia", vram_total=24 * GIB, vram_free=20 * GIB),),
        loaded=(_ps("llama3.2:latest"), _ps("qwen3:8b")),
        parallel=2,
        in_flight=in_flight,
    )


def _samples(
    agents: list[AgentState], queue: dict[str, int]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    class Snapshot:
        def collect(self):  # type: ignore[no-untyped-def]
            return fleet_families(agents, queue)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_fleet_gauges_follow_the_agents_states() -> None:
    got = _samples([_agent("a", in_flight=3), _agent("b", status="cordoned")], {"llama3.2:latest": 4})
    assert got["corral_fleet_agents", (("status", "active"),)] == 1
    assert got["corral_fleet_agents", (("status", "cordoned"),)] == 1
    assert got["corral_fleet_agents", (("status", "draining"),)] == 0
    assert got["corral_fleet_gpu_vram_total_bytes", (("agent", "a"), ("gpu", "0"))] == 24 * GIB
    assert got["corral_fleet_gpu_vram_used_bytes", (("agent", "a"), ("gpu", "0"))] == 4 * GIB
    assert got["corral_fleet_slots", (("agent", "a"), ("model", "qwen3:8b"))] == 2
    assert got["corral_fleet_agent_free_slots", (("agent", "a"),)] == 1  # 2 models x 2 slots - 3
    assert got["corral_fleet_agent_in_flight", (("agent", "a"),)] == 3
    assert got["corral_fleet_queue_depth", (("model", "llama3.2:latest"),)] == 4


def test_the_same_state_gives_the_same_text() -> None:
    agents = [_agent("b"), _agent("a")]
    assert _samples(agents, {}) == _samples(list(reversed(agents)), {})


def test_load_book_counts_loads_and_evictions_by_reason() -> None:
    book = LoadBook()
    book.observe([_ps("llama3.2")], set(), now=0)  # the baseline: not counted
    assert book.loads == {} and book.evictions == {}
    book.observe([_ps("llama3.2"), _ps("qwen3:8b")], {encode_token("qwen3:8b")}, now=1)
    assert book.loads == {("qwen3:8b", "request"): 1}
    # llama3.2 gone as gemma3 arrives: replaced; then qwen3 reloaded at another context
    book.observe([_ps("gemma3:4b"), _ps("qwen3:8b", ctx=8192)], set(), now=2)
    assert book.loads == {("qwen3:8b", "request"): 1, ("gemma3:4b", "other"): 1, ("qwen3:8b", "reload"): 1}
    assert book.evictions[("llama3.2:latest", "replaced")] == 1
    assert book.evictions[("qwen3:8b", "reload")] == 1
    # expired keep_alive, and an unload with nothing loaded in its place
    book.observe([_ps("qwen3:8b", ctx=8192)], set(), now=2e10)  # past its expiry (2318)
    assert book.evictions[("gemma3:4b", "expired")] == 1
    book.observe([], set(), now=0)
    assert book.evictions[("qwen3:8b", "unloaded")] == 1


def test_labels_are_bounded() -> None:
    assert endpoint_label("/api/chat") == "/api/chat"
    assert endpoint_label("/api/blobs/sha256:" + "0" * 64) == "/api/blobs"
    assert endpoint_label("/whatever/" + "x" * 40) == "other"
    assert streamed("application/x-ndjson") and streamed("text/event-stream; charset=utf-8")
    assert not streamed("application/json; charset=utf-8")


def test_decision_headers() -> None:
    d = Decision(started=0.0, strategy="auto", route="queued", queue_s=0.2504)
    assert d.headers("amd-1") == [
        (b"x-corral-agent", b"amd-1"),
        (b"x-corral-route", b"queued"),
        (b"x-corral-queue-ms", b"250"),
    ]
    assert Decision(started=0.0).headers("") == []
