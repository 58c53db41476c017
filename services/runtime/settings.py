"""Settings: one frozen Struct per service, built once from ``CORRAL_*`` env vars and CLI flags.

Nothing else in Corral reads ``os.environ``. Precedence: CLI flag > environment > default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

ENV_PREFIX = "CORRAL_"

S = TypeVar("S", bound=msgspec.Struct)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def load_settings(
    cls: type[S], overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> S:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        raw = env.get(env_name(field.name))
        if raw is not None and raw != "":
            values[field.name] = _from_env(raw, field.type)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as e:
        name = str(e).rpartition("$.")[2]
        where = f" ({env_name(name)} / --{name.replace('_', '-')})" if name.isidentifier() else ""
        raise SystemExit(f"invalid setting{where}: {e}") from None


def _from_env(raw: str, tp: Any) -> Any:
    """Lists and tuples come as comma-separated env values; everything else converts as text."""
    origin = getattr(tp, "__origin__", None)
    if origin in (list, tuple):
        return [p.strip() for p in raw.split(",") if p.strip()]
    return raw


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    root: str = "corral"  # subject root and KV bucket prefix; several fleets may share one NATS
    log_level: str = "INFO"
    otlp_endpoint: str = ""  # OTLP/HTTP traces endpoint; empty = tracing off
