"""The README's configuration table and the settings declarations must agree, both ways.

Each row names a variable, its flags, its default, the services that use it and its meaning; the
variables, defaults and services must be the declared ones, and every flag in a row must be a flag of
each service that uses it (in that service's real, generated parser). The flags mentioned in "The
processes" must parse too.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from corral import fleetctl, up
from corral.agent import __main__ as agent_main
from corral.agent.settings import AgentSettings
from corral.aggregator import __main__ as aggregator_main
from corral.aggregator.settings import AggregatorSettings
from corral.cli import FLEET_COMMANDS
from corral.gateway import __main__ as gateway_main
from corral.gateway.settings import GatewaySettings
from corral.registry import __main__ as registry_main
from corral.registry.settings import RegistrySettings
from corral.runtime import natsmain
from corral.runtime.settings import SERVICES_ONLY, CommonSettings, Setting, describe, env_name
from corral.simulator import __main__ as sim_main

README = Path(__file__).parents[2] / "README.md"
SERVICES: dict[str, tuple[type[msgspec.Struct], Callable[[], argparse.ArgumentParser]]] = {
    "gateway": (GatewaySettings, gateway_main.parser),
    "registry": (RegistrySettings, registry_main.parser),
    "aggregator": (AggregatorSettings, aggregator_main.parser),
    "agent": (AgentSettings, agent_main.parser),
}
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "up": up.parser,
    "nats": natsmain.parser,
    "sim": sim_main.build_parser,
    **{name: parser for name, (_, parser) in SERVICES.items()},
    **{name: functools.partial(fleetctl.parser, name) for name in FLEET_COMMANDS},
}


class Row(msgspec.Struct, frozen=True):
    flags: tuple[str, ...]
    default: str
    used_by: str
    meaning: str


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def documented() -> dict[str, Row]:
    rows = re.findall(
        r"^\| `(CORRAL_[A-Z0-9_]+)` \| ([^|]*) \| ([^|]+) \| ([^|]+) \| (.+) \|$",
        section("Configuration"),
        re.M,
    )
    out: dict[str, Row] = {}
    for name, flags, default, used_by, meaning in rows:
        assert name not in out, f"{name} has two rows"
        out[name] = Row(
            tuple(re.findall(r"`(--[a-z0-9-]+)`", flags)), default.strip(), used_by.strip(), meaning
        )
    return out


def declared() -> dict[str, tuple[Setting, set[str]]]:
    """Each variable, as the first service declares it, and every service that uses it."""
    out: dict[str, tuple[Setting, set[str]]] = {}
    for service, (cls, _) in SERVICES.items():
        for s in describe(cls).values():
            first, users = out.setdefault(s.env, (s, set()))
            assert (s.default_text, s.flags) == (first.default_text, first.flags), (
                f"{s.env} is declared differently by two services; one table row cannot show both"
            )
            users.add(service)
    return out


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return dict(parser._option_string_actions)


def test_every_setting_has_one_row_and_nothing_else() -> None:
    assert set(documented()) == set(declared())


def test_documented_defaults_are_the_declared_ones() -> None:
    rows = documented()
    for env, (s, _) in declared().items():
        cell = rows[env].default
        if s.shown:  # a default in words, e.g. "0 (probe)": the same words, code marks aside
            assert cell.replace("`", "") == s.shown, (env, cell, s.shown)
        else:
            assert cell == f"`{s.default}`", (env, cell, s.default)


def test_used_by_names_the_services_that_declare_it() -> None:
    rows = documented()
    common = {s.env for s in describe(CommonSettings).values()}
    for env, (_, users) in declared().items():
        cell = rows[env].used_by
        if env in common:  # every process, or the services alone (`SERVICES_ONLY`)
            assert cell == ("services" if env in {env_name(n) for n in SERVICES_ONLY} else "all"), env
        else:
            assert set(cell.split(", ")) == users, (env, cell, users)


def test_each_row_names_the_flags_of_every_service_that_uses_it() -> None:
    rows = documented()
    parsers = {service: options(parser()) for service, (_, parser) in SERVICES.items()}
    for env, (s, users) in declared().items():
        row = rows[env]
        assert set(row.flags) == set(s.flags), (env, row.flags, s.flags)
        assert row.flags[0] == s.flag, f"{env}: the generated flag comes first"
        for service in users:
            for flag in row.flags:
                assert flag in parsers[service], f"{env}: `corral {service}` has no {flag}"
                assert parsers[service][flag].dest == s.name, (env, service, flag)
        assert row.meaning.strip(), env


def test_the_check_can_fail() -> None:
    """A flag no parser has is not in any row's flags, and the table parses into every row."""
    assert "--no-such-flag" not in options(gateway_main.parser())
    assert len(documented()) == len(declared()) > 30


PROCESS_ROW = re.compile(r"^\| `corral (\w+).*\|$", re.M)


def process_rows() -> list[tuple[str, list[str]]]:
    """Each command in the tables of "The processes", with the flags its row mentions."""
    rows = [
        (m.group(1), re.findall(r"(--[a-z0-9-]+)", m.group(0)))
        for m in PROCESS_ROW.finditer(section("The processes"))
    ]
    return [(command, flags) for command, flags in rows if command in PARSERS]


@pytest.mark.parametrize(("command", "flags"), process_rows(), ids=[c for c, _ in process_rows()])
def test_flags_in_the_processes_table_exist(command: str, flags: list[str]) -> None:
    known = options(PARSERS[command]())
    assert [f for f in flags if f not in known] == [], command


def test_the_processes_table_is_read() -> None:
    mentioned = dict(process_rows())
    assert set(mentioned) == set(PARSERS) - {"cordon", "uncordon"}  # on the drain row
    assert "--strategy" in mentioned["gateway"] and "--ollama" in mentioned["agent"]
    assert "--replicas" in mentioned["pull"]


def test_terminal_commands_take_the_flags_the_processes_section_names() -> None:
    line = next(
        x for x in section("The processes").splitlines() if x.startswith("And for people at a terminal")
    )
    flags = re.findall(r"`(--[a-z0-9-]+)`", line)
    assert flags == ["--nats", "--root", "--json"]
    for command in FLEET_COMMANDS:
        known = options(fleetctl.parser(command))
        assert all(flag in known for flag in flags), command
