"""The registry's settings: each declared once (type, default, doc); flags and env vars derive from it."""

from __future__ import annotations

from typing import Annotated

from corral.runtime.settings import CommonSettings, setting


class RegistrySettings(CommonSettings, frozen=True, kw_only=True):
    dead_after_s: Annotated[
        float,
        setting(
            "an agent silent this long is removed and announced dead",
            ge=0,
            flags=["--dead-after"],
            shown="0 (3 heartbeats)",
        ),
    ] = 0.0
    probe_s: Annotated[
        float,
        setting(
            "every this often, each agent is asked over NATS whether it is there; one whose connection "
            "is gone (nothing subscribes to its subjects for 6 s and three of these) is removed and "
            "announced dead before its heartbeats run out; 0 = by heartbeats only",
            ge=0,
        ),
    ] = 1.0
    probes_per_s: Annotated[
        float,
        setting(
            "at most this many agent probes a second from this registry copy: a larger fleet is probed "
            "less often than every probe_s (0: no bound)",
            ge=0,
        ),
    ] = 250.0
    pull_timeout_s: Annotated[float, setting("how long a fleet-wide pull may take", gt=0)] = 3600.0
    replica_check_s: Annotated[
        float,
        setting(
            "demand-driven replicas: decided on each queue nudge; every this often, every model's queue "
            "depth is read too (for nudges that were missed); 0 = no demand-driven replicas",
            ge=0,
            period=True,
        ),
    ] = 5.0
    rebalance_s: Annotated[
        float,
        setting(
            "rebalancing under a steady load: each model's requests running and waiting are averaged "
            "over this long; a card switches to a model that waits from one with slots to spare when "
            "that lowers the fleet's waiting requests (one switch at a time, this long apart); 0 = off",
            ge=0,
            period=True,
        ),
    ] = 30.0
    load_grace_s: Annotated[
        float,
        setting("a load marker counts as live this long before its agent shows the load", ge=0, period=True),
    ] = 1.0
    load_marker_ttl_s: Annotated[
        float,
        setting("a load marker is deleted this long after it was written, whatever its agent shows", gt=0),
    ] = 300.0
    ping_interval_s: Annotated[
        float, setting("keep-alive on a silent pull's reply (well under the gateway's idle timeout)", gt=0)
    ] = 2.0
