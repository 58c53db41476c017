"""The agent's settings: each declared once (type, default, doc); flags and env vars derive from it."""

from __future__ import annotations

from typing import Annotated, Literal

from corral.runtime.settings import CommonSettings, setting

# the GPU vendors an agent may declare; empty = detect (corral.protocol.names.VENDORS, plus "")
Vendor = Literal["", "nvidia", "amd", "intel", "apple", "cpu"]


class AgentSettings(CommonSettings, frozen=True, kw_only=True):
    id: Annotated[str, setting("agent id, unique in the fleet", shown="<hostname>-<port>")] = ""
    ollama_url: Annotated[str, setting("the Ollama this agent serves", flags=["--ollama"], secret=True)] = (
        "http://127.0.0.1:11434"
    )
    vendor: Annotated[Vendor, setting("GPU vendor", shown="detect")] = ""
    parallel: Annotated[
        int, setting("slots per loaded model: set it to that Ollama's OLLAMA_NUM_PARALLEL", ge=1)
    ] = 1
    max_queue: Annotated[
        int, setting("requests waiting at this agent for a slot before it answers busy", ge=0)
    ] = 64
    heartbeat_s: Annotated[float, setting("state heartbeat; three missed = treated as dead", gt=0)] = 5.0
    refresh_s: Annotated[
        float, setting("how often it re-reads its Ollama's /api/tags and /api/ps", gt=0, period=True)
    ] = 5.0
    ping_interval_s: Annotated[
        float, setting("keep-alive on silent requests (well under the gateway's idle timeout)", gt=0)
    ] = 2.0
    drain_grace_s: Annotated[float, setting("on stop, how long in-flight requests may finish", ge=0)] = 30.0
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
