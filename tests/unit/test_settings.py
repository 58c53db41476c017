"""Settings: override > environment > default, comma-separated lists, bad values exit clearly."""

from __future__ import annotations

import msgspec
import pytest
from corral.runtime.settings import ENV_PREFIX, CommonSettings, env_name, load_settings


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
def test_bad_env_value_exits_with_a_clear_message(env: dict[str, str], field: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(DemoSettings, environ=env)
    message = str(info.value.code)
    assert message.startswith("invalid setting")
    assert field in message


def test_bad_override_exits_too() -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(DemoSettings, overrides={"port": "eighty"}, environ={})
    assert "port" in str(info.value.code)


def test_settings_are_frozen() -> None:
    s = load_settings(DemoSettings, environ={})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_common_settings_alone() -> None:
    s = load_settings(CommonSettings, environ={"CORRAL_LOG_LEVEL": "DEBUG"})
    assert type(s) is CommonSettings
    assert s.log_level == "DEBUG"
