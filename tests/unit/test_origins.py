"""The Host and Origin rules browsers meet at the gateway, as Ollama's: local names and addresses,
the default origins, CORRAL_ORIGINS globs, and the gateway's own origin only where no rebound DNS
name can pose as it."""

from __future__ import annotations

import pytest
from corral.gateway.origins import Origins, host_name, is_loopback


def rules(*extra: str, check_host: bool = True) -> Origins:
    return Origins(extra, check_host=check_host, hostname="gpu-box", addresses=["203.0.113.7"])


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:11434", "localhost"),
        ("LOCALHOST", "localhost"),
        ("[::1]:11434", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("example.com:80", "example.com"),
        ("[::1]evil.com", "[::1]evil.com"),  # not an address and a port: whole, so never local
        ("[::1]:x", "[::1]:x"),
    ],
)
def test_a_host_header_loses_its_port(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("gpu-box", False)],
)  # fmt: skip
def test_which_listen_addresses_are_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    "host",
    [
        None, "", "localhost", "localhost:11434", "127.0.0.1:11434", "[::1]:11434", "0.0.0.0",
        "10.1.2.3", "172.16.0.9", "192.168.1.4:11434", "[fd00::1]", "gpu-box", "GPU-BOX:11434",
        "203.0.113.7", "ollama.localhost", "printer.local:80", "gw.internal",
    ],
)  # fmt: skip
def test_local_hosts_pass_a_loopback_gateway(host: str | None) -> None:
    assert rules().host_allowed(host)


@pytest.mark.parametrize(
    "host",
    [
        "evil.com",
        "evil.com:11434",
        "localhost.evil.com",
        "8.8.8.8",
        "192.0.2.1",
        "[2001:db8::1]",
        "local",
        "[::1]evil.com",
        "localhost.",
    ],
)
def test_other_hosts_are_refused_on_a_loopback_gateway_and_served_on_any_other(host: str) -> None:
    assert not rules().host_allowed(host)
    assert rules(check_host=False).host_allowed(host)


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost", "https://localhost:3000", "http://127.0.0.1:8080", "http://0.0.0.0:1",
        "app://anything", "file://", "tauri://localhost", "vscode-webview://abc", "vscode-file://vscode-app",
        "HTTP://LOCALHOST:5173",
    ],
)  # fmt: skip
def test_ollamas_default_origins_are_allowed(origin: str) -> None:
    assert rules().origin_allowed(origin, "127.0.0.1:11434")


@pytest.mark.parametrize(
    "origin",
    ["http://evil.com", "https://localhost.evil.com", "http://127.0.0.2:8080", "null", "http://[::1]:80"],
)
def test_other_origins_are_refused_by_default(origin: str) -> None:
    assert not rules().origin_allowed(origin, "127.0.0.1:11434")


def test_corral_origins_adds_globs_and_a_lone_star_allows_every_origin() -> None:
    r = rules(" https://*.example.com ", "http://127.0.0.2:*", "", "http://[::1]:*", "http://a?b.example")
    assert r.origin_allowed("http://[::1]:3000", None)  # brackets are themselves, not a class
    assert r.origin_allowed("http://a?b.example", None) and not r.origin_allowed("http://axb.example", None)
    assert r.origin_allowed("https://chat.example.com", "127.0.0.1:11434")
    assert r.origin_allowed("http://127.0.0.2:8080", "127.0.0.1:11434")
    assert not r.origin_allowed("https://example.org", "127.0.0.1:11434")
    assert not r.any_origin
    star = rules("*")
    assert star.any_origin and star.origin_allowed("https://anything.example", None)


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://192.0.2.10:11434", "192.0.2.10:11434", True),  # reached by an address
        ("http://[2001:db8::5]:11434", "[2001:db8::5]:11434", True),
        ("http://gpu-box:11434", "gpu-box:11434", True),  # this machine's name
        ("http://gw.internal:11434", "gw.internal:11434", True),
        ("http://evil.com:11434", "evil.com:11434", False),  # a name rebound to the gateway
        ("http://192.0.2.10:11434", "192.0.2.11:11434", False),  # another origin
        ("ftp://192.0.2.10:11434", "192.0.2.10:11434", False),
        ("http://192.0.2.10:11434", None, False),
    ],
)
def test_the_gateways_own_origin_is_allowed_only_where_no_rebound_name_can_pose_as_it(
    origin: str, host: str | None, allowed: bool
) -> None:
    assert rules(check_host=False).origin_allowed(origin, host) is allowed


def test_verdicts_are_remembered_but_made_up_headers_cannot_grow_the_memory() -> None:
    r = rules()
    for i in range(2_000):
        assert not r.host_allowed(f"h{i}.example.com")
        assert not r.origin_allowed(f"http://h{i}.example.com", None)
    assert len(r._hosts) <= 256 and len(r._origins) <= 256
