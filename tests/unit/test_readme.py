"""The README's configuration table and the settings Structs must agree, both ways."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
from corral.agent.settings import AgentSettings
from corral.aggregator.settings import AggregatorSettings
from corral.gateway.settings import GatewaySettings
from corral.registry.settings import RegistrySettings
from corral.runtime.settings import CommonSettings, env_name

README = Path(__file__).parents[2] / "README.md"


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `(CORRAL_[A-Z0-9_]+)` \| ([^|]+) \|", README.read_text(), re.M)
    return {name: default.strip() for name, default in rows}


def test_every_setting_is_documented_and_nothing_else() -> None:
    fields = {
        env_name(f.name)
        for cls in (CommonSettings, GatewaySettings, AgentSettings, RegistrySettings, AggregatorSettings)
        for f in msgspec.structs.fields(cls)
    }
    assert set(_documented()) == fields


def test_documented_defaults_match() -> None:
    documented = _documented()
    for cls in (CommonSettings, GatewaySettings, AgentSettings, RegistrySettings, AggregatorSettings):
        for f in msgspec.structs.fields(cls):
            default = f.default
            if default in ("", 0.0) and not isinstance(default, bool):
                continue  # documented in words: "(off)", "(detect)", "hostname", "0 (probe)"
            assert f"`{default}`" in documented[env_name(f.name)], (f.name, default)
