"""The agent's settings: each declared once (type, default, doc); flags and env vars derive from it."""

from __future__ import annotations

from typing import Annotated, Literal

from corral.protocol.subjects import AGENT_ID_PATTERN
from corral.runtime.settings import CommonSettings, setting

# the GPU vendors an agent may declare; empty = detect (corral.protocol.names.VENDORS, plus "")
Vendor = Literal["", "nvidia", "amd", "intel", "apple", "cpu"]


class AgentSettings(CommonSettings, frozen=True, kw_only=True):
    """Every setting of `corral agent`: twenty-two attributes, a flag and a variable each (as with
    the other services' settings): the Ollama it serves, its slots and periods, and how it finds
    several Ollamas on one host (Docker discovery, one spawned Ollama per GPU)."""

    id: Annotated[
        str,
        setting(
            "agent id, unique in the fleet; letters, digits, _ and -, and not `registry` (the registry's own)",
            pattern=AGENT_ID_PATTERN,
            shown="<hostname>-<port>",
        ),
    ] = ""
    ollama_url: Annotated[str, setting("the Ollama this agent serves", flags=["--ollama"], secret=True)] = (
        "http://127.0.0.1:11434"
    )
    vendor: Annotated[Vendor, setting("GPU vendor", shown="detect")] = ""
    parallel: Annotated[
        int, setting("slots per loaded model: set it to that Ollama's OLLAMA_NUM_PARALLEL", ge=1)
    ] = 1
    batch_reserve: Annotated[
        int,
        setting(
            "slots per loaded model that batch-priority work leaves free for interactive requests "
            "(never all of them: with one slot, batch and interactive share it, interactive first)",
            ge=0,
        ),
    ] = 1
    max_queue: Annotated[
        int, setting("requests waiting at this agent for a slot before it answers busy", ge=0)
    ] = 64
    heartbeat_s: Annotated[float, setting("state heartbeat; three missed = treated as dead", gt=0)] = 5.0
    refresh_s: Annotated[
        float, setting("how often it re-reads its Ollama's /api/tags and /api/ps", gt=0, period=True)
    ] = 5.0
    ping_interval_s: Annotated[
        float,
        setting("a ping on every request: keep-alive and check that its requester is there", gt=0),
    ] = 2.0
    drain_grace_s: Annotated[float, setting("on stop, how long in-flight requests may finish", ge=0)] = 30.0
    stall_s: Annotated[
        float,
        setting(
            "a streamed request its Ollama sends nothing for this long (between two tokens, or before "
            "the first once its model is loaded) ends with an error, one that had sent nothing is "
            "tried on another agent; 0 = never",
            ge=0,
        ),
    ] = 300.0
    vram_gb: Annotated[
        float, setting("override the GPU probe with this much VRAM", ge=0, shown="0 (probe)")
    ] = 0.0
    context_length: Annotated[
        int,
        setting(
            "that Ollama's OLLAMA_CONTEXT_LENGTH; 0 = Ollama's VRAM tier rule",
            ge=0,
            shown="0 (Ollama's rule)",
        ),
    ] = 0
    advertise_host: Annotated[str, setting("host name shown in fleet views", shown="hostname")] = ""
    # several Ollamas on this host, one agent each (see corral.agent.docker and corral.agent.spawn)
    docker: Annotated[
        bool, setting("run one agent per running Ollama container of the Docker engine, following its events")
    ] = False
    docker_host: Annotated[
        str,
        setting(
            "the Docker engine to follow (unix:///var/run/docker.sock, tcp://host:2376)",
            shown="DOCKER_HOST, else the local socket",
        ),
    ] = ""
    docker_network: Annotated[
        str,
        setting(
            "reach Ollama containers at their address on this Docker network, not their published port",
            shown="published port",
        ),
    ] = ""
    spawn: Annotated[
        bool, setting("start one `ollama serve` per GPU of this host, supervised, and one agent for each")
    ] = False
    spawn_port: Annotated[
        int,
        setting(
            "with --spawn: GPU 0's Ollama port, GPU N's is N higher; 0 = a free port each", ge=0, le=65535
        ),
    ] = 11435
    gpus: Annotated[
        int,
        setting("with --spawn: serve GPUs 0..N-1 whatever the probe finds", ge=0, shown="0 (probe)"),
    ] = 0
    max_loaded_models: Annotated[
        int,
        setting(
            "the Ollama's OLLAMA_MAX_LOADED_MODELS, which the router's fit plan follows (with --spawn: "
            "set on each Ollama it starts)",
            ge=0,
            shown="0 (Ollama's default)",
        ),
    ] = 0
    metrics_port: Annotated[
        int,
        setting(
            "serve Prometheus /metrics (slots per model, loads, evictions) on this port; 0 = off",
            ge=0,
            le=65535,
            shown="0 (off)",
        ),
    ] = 0
    models_dir: Annotated[
        str, setting("with --spawn: the model directory they share (OLLAMA_MODELS)", shown="Ollama's default")
    ] = ""
