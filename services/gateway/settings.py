"""The gateway's settings: one field per setting, read from ``CORRAL_*`` and flags."""

from __future__ import annotations

from corral.runtime.settings import CommonSettings


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 11434
    claim_timeout_s: float = 2.0  # an agent must claim a request within this
    idle_timeout_s: float = 10.0  # a claimed request silent this long means its agent died
    queue_timeout_s: float = 60.0  # how long a request may wait for capacity before 503
    ollama_version: str = "0.12.3"  # reported by /api/version when no backend says
    strategy: str = "auto"  # routing when a request names none (X-Load-Balancing-Strategy)
    queue: bool = True  # auto: wait for a slot in the fleet-wide queue (False: at the agents)
    queue_depth: int = 512  # requests that may wait per model (and vendor pin) before 503
    sessions: bool = True  # auto: send a conversation's follow-up turns to its agent
    load_grace_s: float = (
        1.0  # a load this gateway starts counts as under way this long before the agent shows it
    )
    queue_recheck_s: float = 1.0  # a queued request checks this often that an agent still serves its model
    auto_pull: bool = False  # a request for a model no agent has pulls it onto one agent first
