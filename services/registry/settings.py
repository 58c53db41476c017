"""The registry's settings: one field per setting, read from ``CORRAL_*`` and flags."""

from __future__ import annotations

from corral.runtime.settings import CommonSettings


class RegistrySettings(CommonSettings, frozen=True, kw_only=True):
    dead_after_s: float = 0.0  # an agent silent this long is dead; 0 = three of its own heartbeats
    pull_timeout_s: float = 3600.0  # a fleet-wide pull may take this long
    replica_check_s: float = 1.0  # read queue depths this often for demand-driven replicas; 0 = off
    replica_patience: int = 2  # checks in a row a model's queue drains slower than a load takes
    load_grace_s: float = 1.0  # a load marker counts as live this long before its agent shows the load
    ping_interval_s: float = (
        2.0  # keep-alive on a pull's reply while it is silent (under the gateway's idle timeout)
    )
