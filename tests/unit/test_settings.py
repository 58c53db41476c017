"""Settings: override > environment > default, comma-separated lists, bad values named clearly."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from corral import routing, up
from corral.agent import __main__ as agent_main
from corral.agent.settings import AgentSettings, Vendor
from corral.aggregator import __main__ as aggregator_main
from corral.aggregator.settings import AggregatorSettings
from corral.gateway import __main__ as gateway_main
from corral.gateway.settings import GatewaySettings, Strategy
from corral.protocol.names import VENDORS
from corral.registry import __main__ as registry_main
from corral.registry.settings import RegistrySettings
from corral.runtime.nats import server_urls
from corral.runtime.settings import (
    ENV_PREFIX,
    SERVICES_ONLY,
    CommonSettings,
    SettingsError,
    add_arguments,
    describe,
    env_name,
    gateway_url,
    load_settings,
    mask,
    setting,
    settings_from_args,
)


class DemoSettings(CommonSettings, frozen=True, kw_only=True):
    port: int = 8080
    ratio: float = 0.5
    debug: bool = False
    peers: tuple[str, ...] = ()
    weights: list[int] = msgspec.field(default_factory=list)


def test_env_names() -> None:
    assert ENV_PREFIX == "CORRAL_"
    assert env_name("nats_url") == "CORRAL_NATS_URL"
    assert env_name("port") == "CORRAL_PORT"


def test_defaults_with_an_empty_environment() -> None:
    s = load_settings(DemoSettings, environ={})
    assert s == DemoSettings()
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.root == "corral"
    assert s.log_level == "INFO"
    assert s.otlp_endpoint == ""
    assert (s.port, s.ratio, s.debug, s.peers, s.weights) == (8080, 0.5, False, (), [])


def test_environment_values_are_converted() -> None:
    env = {
        "CORRAL_NATS_URL": "nats://nats:4222",
        "CORRAL_ROOT": "fleet2",
        "CORRAL_PORT": "9000",
        "CORRAL_RATIO": "0.25",
        "CORRAL_DEBUG": "true",
    }
    s = load_settings(DemoSettings, environ=env)
    assert (s.nats_url, s.root, s.port, s.ratio, s.debug) == ("nats://nats:4222", "fleet2", 9000, 0.25, True)


def test_override_beats_environment_beats_default() -> None:
    env = {"CORRAL_PORT": "9000", "CORRAL_ROOT": "from-env"}
    s = load_settings(DemoSettings, overrides={"port": 1234}, environ=env)
    assert s.port == 1234  # override
    assert s.root == "from-env"  # environment
    assert s.log_level == "INFO"  # default


def test_none_override_means_not_given() -> None:
    # argparse leaves unset flags as None; they must not hide the environment.
    s = load_settings(DemoSettings, overrides={"port": None, "root": None}, environ={"CORRAL_PORT": "9000"})
    assert s.port == 9000
    assert s.root == "corral"


def test_empty_env_value_means_unset() -> None:
    s = load_settings(DemoSettings, environ={"CORRAL_PORT": "", "CORRAL_ROOT": ""})
    assert (s.port, s.root) == (8080, "corral")


def test_unrelated_and_differently_cased_env_vars_are_ignored() -> None:
    env = {"PORT": "1", "corral_port": "2", "CORRAL_PORTS": "3", "OLLAMA_HOST": "x"}
    assert load_settings(DemoSettings, environ=env).port == 8080


def test_explicit_environ_means_the_process_environment_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_PORT", "4321")
    assert load_settings(DemoSettings, environ={}).port == 8080


@pytest.mark.parametrize(
    ("raw", "peers"),
    [
        ("a", ("a",)),
        ("a,b", ("a", "b")),
        (" a , b ,, c ,", ("a", "b", "c")),
        ("nats://n1:4222,nats://n2:4222", ("nats://n1:4222", "nats://n2:4222")),
    ],
)
def test_comma_separated_tuples(raw: str, peers: tuple[str, ...]) -> None:
    assert load_settings(DemoSettings, environ={"CORRAL_PEERS": raw}).peers == peers


def test_comma_separated_lists_convert_their_items() -> None:
    assert load_settings(DemoSettings, environ={"CORRAL_WEIGHTS": "1, 2,3"}).weights == [1, 2, 3]


def test_list_override_is_taken_as_is() -> None:
    s = load_settings(DemoSettings, overrides={"peers": ["x", "y"]}, environ={"CORRAL_PEERS": "a,b"})
    assert s.peers == ("x", "y")


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"CORRAL_PORT": "abc"}, "port"),
        ({"CORRAL_PORT": "80.5"}, "port"),
        ({"CORRAL_RATIO": "half"}, "ratio"),
        ({"CORRAL_DEBUG": "maybe"}, "debug"),
        ({"CORRAL_WEIGHTS": "1,two"}, "weights"),
    ],
)
def test_bad_env_value_raises_a_settings_error_naming_variable_and_flag(
    env: dict[str, str], field: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(DemoSettings, environ=env)
    message = str(info.value)
    assert message.startswith(f"invalid setting {env_name(field)} / --{field}: ")
    assert (info.value.field, info.value.env, info.value.flag) == (field, env_name(field), f"--{field}")
    assert not isinstance(info.value, SystemExit)


def test_bad_override_raises_too() -> None:
    with pytest.raises(SettingsError, match=r"CORRAL_PORT / --port: Expected `int` \(got 'eighty'\)"):
        load_settings(DemoSettings, overrides={"port": "eighty"}, environ={})


def test_settings_are_frozen() -> None:
    s = load_settings(DemoSettings, environ={})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_common_settings_alone() -> None:
    s = load_settings(CommonSettings, environ={"CORRAL_LOG_LEVEL": "DEBUG"})
    assert type(s) is CommonSettings
    assert s.log_level == "DEBUG"


# -- the services' declarations, their flags and their errors ----------------------------------
SERVICES: dict[str, tuple[type[msgspec.Struct], Callable[[], argparse.ArgumentParser]]] = {
    "gateway": (GatewaySettings, gateway_main.parser),
    "agent": (AgentSettings, agent_main.parser),
    "registry": (RegistrySettings, registry_main.parser),
    "aggregator": (AggregatorSettings, aggregator_main.parser),
}
MAINS = {
    "gateway": gateway_main.main,
    "agent": agent_main.main,
    "registry": registry_main.main,
    "aggregator": aggregator_main.main,
}
COMMON_OLD_FLAGS = [
    ("--nats", "nats://hub:4222", "nats_url", "nats://hub:4222"),
    ("--root", "fleet2", "root", "fleet2"),
    ("--log-level", "DEBUG", "log_level", "DEBUG"),
    ("--log-level", "warning", "log_level", "WARNING"),  # any case, as before
    ("--otlp-endpoint", "http://otel:4318", "otlp_endpoint", "http://otel:4318"),
]
# every flag the processes took before their flags were generated, and the field it set
OLD_FLAGS = {
    "gateway": [
        ("--host", "0.0.0.0", "host", "0.0.0.0"),
        ("--port", "8080", "port", 8080),
        ("--queue-timeout", "5", "queue_timeout_s", 5.0),
    ],
    "agent": [
        ("--ollama", "http://gpu1:11434", "ollama_url", "http://gpu1:11434"),
        ("--vendor", "amd", "vendor", "amd"),
        ("--id", "box-1", "id", "box-1"),
        ("--parallel", "4", "parallel", 4),
        ("--max-queue", "8", "max_queue", 8),
        ("--vram-gb", "24", "vram_gb", 24.0),
    ],
    "registry": [("--dead-after", "20", "dead_after_s", 20.0)],
    "aggregator": [
        ("--window", "30", "stats_window_s", 30.0),
        ("--interval", "0.5", "views_interval_s", 0.5),
    ],
}
SERVICE_FLAG_CASES = [
    (service, *case) for service in SERVICES for case in [*OLD_FLAGS[service], *COMMON_OLD_FLAGS]
]


def parse(service: str, argv: list[str], environ: Mapping[str, str] | None = None) -> Any:
    cls, parser = SERVICES[service]
    return settings_from_args(cls, parser().parse_args(argv), environ={} if environ is None else environ)


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return dict(p._option_string_actions)


@pytest.mark.parametrize("service", SERVICES)
def test_every_setting_is_declared_with_a_doc_and_has_its_flag(service: str) -> None:
    cls, parser = SERVICES[service]
    flags = options(parser())
    for s in describe(cls).values():
        assert s.doc, f"{cls.__name__}.{s.name} has no doc"
        action = flags[f"--{s.name.replace('_', '-')}"]
        assert action.dest == s.name
        assert action.help is not None and s.doc.replace("%", "%%") in action.help
        assert f"default: {s.default_text}" in action.help and s.env in action.help
        if s.type is bool:
            assert flags["--no-" + s.name.replace("_", "-")] is action
    generated = {a.dest for a in flags.values() if a.dest != "help"}
    assert generated == set(describe(cls)), "a flag that is no setting"


@pytest.mark.parametrize(("service", "flag", "value", "field", "expected"), SERVICE_FLAG_CASES)
def test_old_flags_still_set_the_same_field(
    service: str, flag: str, value: str, field: str, expected: Any
) -> None:
    settings = parse(service, [flag, value])
    assert getattr(settings, field) == expected
    assert getattr(parse(service, []), field) != expected  # the flag, not the default, gave it


def test_generated_flags_set_every_kind_of_field() -> None:
    s = parse(
        "gateway",
        ["--nats-url", "nats://a:4222", "--claim-timeout-s", "0.5", "--strategy", "round_robin"]
        + ["--no-queue", "--queue-depth", "7", "--auto-pull", "--ollama-version", "0.13.0"],
    )
    assert (s.nats_url, s.claim_timeout_s, s.strategy) == ("nats://a:4222", 0.5, "round_robin")
    assert (s.queue, s.queue_depth, s.auto_pull, s.ollama_version) == (False, 7, True, "0.13.0")
    a = parse("agent", ["--ollama-url", "http://x:1", "--context-length", "8192", "--advertise-host", "box"])
    assert (a.ollama_url, a.context_length, a.advertise_host) == ("http://x:1", 8192, "box")


def test_flag_beats_environment_beats_default() -> None:
    env = {
        "CORRAL_PORT": "9000",
        "CORRAL_ROOT": "from-env",
        "CORRAL_QUEUE": "false",
        "CORRAL_SESSIONS": "false",
    }
    s = parse("gateway", ["--port", "1234", "--queue"], env)
    assert s.port == 1234  # flag over environment
    assert s.queue is True  # --queue over CORRAL_QUEUE=false
    assert (s.root, s.sessions) == ("from-env", False)  # environment, no flag
    assert s.claim_timeout_s == GatewaySettings().claim_timeout_s  # default
    assert parse("gateway", ["--no-sessions"], {"CORRAL_SESSIONS": "true"}).sessions is False
    assert parse(
        "agent", ["--ollama", "http://flag:1"], {"CORRAL_OLLAMA_URL": "http://env:1"}
    ).ollama_url == ("http://flag:1")


@pytest.mark.parametrize(
    ("cls", "env", "field"),
    [
        (GatewaySettings, {"CORRAL_STRATEGY": "bogus"}, "strategy"),
        (GatewaySettings, {"CORRAL_LOG_LEVEL": "loud"}, "log_level"),
        (AgentSettings, {"CORRAL_VENDOR": "ati"}, "vendor"),
        (GatewaySettings, {"CORRAL_PORT": "70000"}, "port"),
        (GatewaySettings, {"CORRAL_CLAIM_TIMEOUT_S": "0"}, "claim_timeout_s"),
        (GatewaySettings, {"CORRAL_QUEUE_DEPTH": "-1"}, "queue_depth"),
        (AgentSettings, {"CORRAL_PARALLEL": "0"}, "parallel"),
        (AgentSettings, {"CORRAL_HEARTBEAT_S": "-5"}, "heartbeat_s"),
        (AgentSettings, {"CORRAL_VRAM_GB": "-1"}, "vram_gb"),
        (RegistrySettings, {"CORRAL_REPLICA_CHECK_S": "-1"}, "replica_check_s"),
        (RegistrySettings, {"CORRAL_PULL_TIMEOUT_S": "0"}, "pull_timeout_s"),
        (AggregatorSettings, {"CORRAL_VIEWS_INTERVAL_S": "0"}, "views_interval_s"),
    ],
)
def test_out_of_set_or_range_values_are_refused(
    cls: type[msgspec.Struct], env: dict[str, str], field: str
) -> None:
    (raw,) = env.values()
    with pytest.raises(SettingsError) as info:
        load_settings(cls, environ=env)
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid setting {env_name(field)} / --{field.replace('_', '-')}: ")
    assert repr(raw) in str(info.value)


def test_a_closed_set_names_its_values() -> None:
    with pytest.raises(
        SettingsError, match="expected one of 'auto', 'round_robin', .*'affinity' \\(got 'bogus'\\)"
    ):
        load_settings(GatewaySettings, environ={"CORRAL_STRATEGY": "bogus"})
    with pytest.raises(SettingsError, match="CORRAL_STRATEGY / --strategy"):
        load_settings(GatewaySettings, overrides={"strategy": "bogus"}, environ={})


def test_an_empty_choice_says_what_it_stands_for() -> None:
    with pytest.raises(SettingsError, match="expected one of '' \\(detect\\), 'nvidia', 'amd'"):
        load_settings(AgentSettings, environ={"CORRAL_VENDOR": "nvida"})


def test_a_pattern_is_explained_in_words_not_as_the_expression() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(AgentSettings, environ={"CORRAL_ID": "bad id"})
    assert "regex" not in str(info.value) and "letters, digits, _ and -" in str(info.value)
    with pytest.raises(SettingsError) as info:
        load_settings(GatewaySettings, environ={"CORRAL_GATEWAY_ID": "a.b"})
    assert "regex" not in str(info.value) and "up to 64 letters, digits, _ and -" in str(info.value)


def test_limits_themselves_are_allowed() -> None:
    env = {"CORRAL_REPLICA_CHECK_S": "0", "CORRAL_DEAD_AFTER_S": "0"}
    assert load_settings(RegistrySettings, environ=env).replica_check_s == 0
    assert load_settings(GatewaySettings, environ={"CORRAL_PORT": "65535"}).port == 65535


def test_closed_sets_match_without_regard_to_case() -> None:
    assert load_settings(CommonSettings, environ={"CORRAL_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert load_settings(AgentSettings, environ={"CORRAL_VENDOR": "NVIDIA"}).vendor == "nvidia"
    assert load_settings(AgentSettings, environ={"CORRAL_VENDOR": ""}).vendor == ""  # detect


def test_a_bad_flag_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--strategy", "bogus"], ["--port", "eighty"], ["--queue", "yes"]):
        with pytest.raises(SystemExit) as info:
            gateway_main.parser().parse_args(argv)
        assert info.value.code == 2
    assert "argument --strategy: invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("service", MAINS)
def test_main_turns_a_settings_error_into_exit_2(
    service: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORRAL_LOG_LEVEL", "loud")
    assert MAINS[service]([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"corral {service}: invalid setting CORRAL_LOG_LEVEL / --log-level: ")
    assert "Traceback" not in err


def test_the_gateway_strategies_are_the_routers() -> None:
    assert typing.get_args(Strategy) == tuple(routing.STRATEGIES)


def test_the_agent_vendors_are_the_protocols() -> None:
    assert typing.get_args(Vendor) == ("", *VENDORS)


def test_common_flags_for_other_commands() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, CommonSettings)
    args = p.parse_args(["--nats", "nats://n:1", "--log-level", "error"])
    assert settings_from_args(CommonSettings, args, environ={}) == CommonSettings(
        nats_url="nats://n:1", log_level="ERROR"
    )


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (["--host", "0.0.0.0"], "host", "0.0.0.0"),
        (["--port", "8080"], "port", 8080),
        (
            ["--ollama", "amd=http://h:1", "--ollama", "http://h:2"],
            "ollama",
            ["amd=http://h:1", "http://h:2"],
        ),
        (["--parallel", "4"], "parallel", 4),
        (["--sim", "2"], "sim", 2),
        (["--sim-config", "a.toml"], "sim_config", ["a.toml"]),
        (["--time-scale", "0.1"], "time_scale", 0.1),
        (["--nats", "nats://h:4222"], "nats_url", "nats://h:4222"),
        (["--nats-port", "4333"], "nats_port", 4333),
        (["--root", "demo"], "root", "demo"),
        (["--log-level", "debug"], "log_level", "DEBUG"),
    ],
)
def test_corral_up_keeps_its_flags(argv: list[str], field: str, expected: Any) -> None:
    assert getattr(up.parser().parse_args(argv), field) == expected


def test_corral_up_takes_a_sim_config_files_time_scale_unless_told_otherwise(tmp_path: Path) -> None:
    f = tmp_path / "sim.toml"
    f.write_text('vendor = "amd"\ntime_scale = 0.2\n')
    from_file = up.sim_configs(up.parser().parse_args(["--sim-config", str(f)]))
    assert [(c.vendor, c.time_scale) for c in from_file] == [("amd", 0.2)]
    told = up.sim_configs(up.parser().parse_args(["--sim-config", str(f), "--time-scale", "0.5"]))
    assert [c.time_scale for c in told] == [0.5]
    assert [c.time_scale for c in up.sim_configs(up.parser().parse_args([]))] == [1.0, 1.0, 1.0]


def test_corral_up_defaults_are_the_declared_ones() -> None:
    args = up.parser().parse_args([])
    assert (args.host, args.port) == (GatewaySettings().host, GatewaySettings().port)
    assert (args.root, args.log_level, args.nats_url, args.nats_port) == ("corral", "INFO", "", None)
    assert up.NATS_PORT == 4222  # NATS's own, taken when free (`up.embedded_nats_port`)


# -- secrets -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://me:s3cret@hub:4222", "nats://me:***@hub:4222"),
        ("nats://a:p1@n1:4222,nats://b:p2@n2:4222", "nats://a:***@n1:4222,nats://b:***@n2:4222"),
        ("nats://s3cret-token@hub:4222", "nats://***@hub:4222"),  # NATS token authentication
        ("http://u:p%40ss@gpu:11434/api", "http://u:***@gpu:11434/api"),
        ("http://127.0.0.1:11434/a@b", "http://127.0.0.1:11434/a@b"),  # an @ in the path is no user
        ("", ""),
    ],
)
def test_mask(url: str, shown: str) -> None:
    assert mask(url) == shown


def test_secrets_are_masked_in_repr() -> None:
    s = AgentSettings(nats_url="nats://me:s3cret@hub:4222", ollama_url="http://u:pw0rd@gpu:11434")
    text = repr(s)
    assert "s3cret" not in text and "pw0rd" not in text
    assert "nats_url='nats://me:***@hub:4222'" in text and "ollama_url='http://u:***@gpu:11434'" in text
    assert "parallel=1" in text and text.startswith("AgentSettings(")
    assert s.nats_url == "nats://me:s3cret@hub:4222"  # only shown masked
    assert "s3cret" not in str(s) and "s3cret" not in f"{s}"


def test_periods_are_declared_as_such_and_timeouts_are_not() -> None:
    """A simulated fleet scales exactly the fields marked ``period=True`` with its clock."""
    periods = {
        cls.__name__: {s.name for s in describe(cls).values() if s.period}
        for cls in (AgentSettings, RegistrySettings, GatewaySettings, AggregatorSettings)
    }
    assert periods == {
        "AgentSettings": {"refresh_s"},
        "RegistrySettings": {"replica_check_s", "rebalance_s", "load_grace_s"},
        "GatewaySettings": {"load_grace_s", "queue_recheck_s"},
        "AggregatorSettings": set(),
    }
    gateway = describe(GatewaySettings)
    assert not any(gateway[t].period for t in ("claim_timeout_s", "idle_timeout_s", "queue_timeout_s"))


def test_period_is_off_unless_declared() -> None:
    class Periodic(CommonSettings, frozen=True, kw_only=True):
        every_s: typing.Annotated[float, setting("how often", gt=0, period=True)] = 1.0
        within_s: typing.Annotated[float, setting("how long at most", gt=0)] = 1.0

    declared = describe(Periodic)
    assert declared["every_s"].period and not declared["within_s"].period
    assert not declared["nats_url"].period


def test_overrides_that_are_no_setting_are_ignored() -> None:
    assert load_settings(DemoSettings, overrides={"json": True, "port": 1}, environ={}).port == 1


def test_fleet_commands_exit_2_on_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from corral import fleetctl

    monkeypatch.setenv("CORRAL_LOG_LEVEL", "loud")
    assert fleetctl.main("status", []) == 2
    err = capsys.readouterr().err
    assert "corral status:" in err and "CORRAL_LOG_LEVEL" in err


def test_the_nats_url_is_a_comma_separated_server_list() -> None:
    one, cluster, spaced = (
        GatewaySettings(nats_url=url).nats_url
        for url in (
            "nats://127.0.0.1:4222",
            "nats://a:4222,nats://b:4222",
            " nats://a:4222 , nats://u:pw@b:4222,,nats://c:4222, ",
        )
    )
    assert server_urls(one) == ["nats://127.0.0.1:4222"]
    assert server_urls(cluster) == ["nats://a:4222", "nats://b:4222"]
    assert server_urls(spaced) == ["nats://a:4222", "nats://u:pw@b:4222", "nats://c:4222"]
    with pytest.raises(ValueError, match="no NATS server"):
        server_urls(" , ")


@pytest.mark.parametrize("agent_id", ["registry", "a.b", "a b", "gpu*"])
def test_an_agent_id_that_is_no_subject_token_or_is_the_registrys_is_refused(agent_id: str) -> None:
    with pytest.raises(SettingsError, match="CORRAL_ID / --id"):
        load_settings(AgentSettings, environ={"CORRAL_ID": agent_id})
    assert load_settings(AgentSettings, environ={"CORRAL_ID": "registry-2"}).id == "registry-2"


def test_terminal_commands_offer_no_flag_they_do_not_use() -> None:
    from corral import fleetctl, policyctl
    from corral.gateway import keysmain

    for args in (
        fleetctl.parser("ps").parse_args([]),
        policyctl.parser("pin").parse_args([]),
        keysmain.parser().parse_args(["list"]),
    ):
        assert not SERVICES_ONLY & set(vars(args)), vars(args)
        assert "nats_creds" in vars(args) and "js_replicas" in vars(args)


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),  # as OLLAMA_HOST is often written
        ("https://gw.example/", "https://gw.example"),
        (" gpu-box ", "http://gpu-box"),
    ],
)
def test_a_commands_gateway_url_takes_what_people_type(raw: str, url: str) -> None:
    assert gateway_url(raw) == url


@pytest.mark.parametrize("raw", ["ftp://x", "http://", "http://x:port", "://x", ""])
def test_a_commands_gateway_url_refuses_what_is_none(raw: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a gateway URL"):
        gateway_url(raw)


def test_a_gateway_may_not_take_the_registrys_token_in_reply_subjects() -> None:
    assert load_settings(GatewaySettings, environ={"CORRAL_GATEWAY_ID": "gw-1"}).gateway_id == "gw-1"
    for bad in ("registry", "a.b", "x" * 65):
        with pytest.raises(SettingsError, match="CORRAL_GATEWAY_ID"):
            load_settings(GatewaySettings, environ={"CORRAL_GATEWAY_ID": bad})
