"""The agent's settings: one field per setting, read from ``CORRAL_*`` and flags."""

from __future__ import annotations

from corral.runtime.settings import CommonSettings


class AgentSettings(CommonSettings, frozen=True, kw_only=True):
    id: str = ""  # default: <hostname>-<ollama port>
    ollama_url: str = "http://127.0.0.1:11434"
    vendor: str = ""  # nvidia | amd | intel | apple | cpu; empty = detect
    parallel: int = 1  # slots per loaded model; match the backend's OLLAMA_NUM_PARALLEL
    max_queue: int = 64  # direct requests waiting for a slot before the agent answers busy
    heartbeat_s: float = 5.0
    refresh_s: float = 5.0  # re-read the backend's /api/tags and /api/ps this often
    ping_interval_s: float = 2.0
    drain_grace_s: float = 30.0
    vram_gb: float = 0.0  # override the GPU probe (0 = probe)
    context_length: int = 0  # the backend's OLLAMA_CONTEXT_LENGTH; 0 = Ollama's VRAM tier rule
    advertise_host: str = ""  # default: this machine's hostname
