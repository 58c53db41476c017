"""Which browser origins and which ``Host`` names may call the gateway, as pure rules — Ollama's
own, so that a browser meets the same gate in front of the fleet as in front of one ``ollama serve``
(https://github.com/ollama/ollama/blob/main/docs/faq.md, "How can I allow additional web origins
to access Ollama?"):

- **Host.** When the gateway listens on a loopback address, a request whose ``Host`` is not local
  — ``localhost``, this machine's name, a loopback, private or unspecified IP or one of this
  machine's, a name under ``.localhost``, ``.local`` or ``.internal`` — is refused: a web page
  whose name was made to resolve to 127.0.0.1 (DNS rebinding) cannot reach it. Listening on any
  other address, every ``Host`` is accepted.
- **Origin.** A request that carries an ``Origin`` (a browser's) is refused unless the origin is
  allowed: ``http(s)://localhost``, ``127.0.0.1`` and ``0.0.0.0`` on any port, ``app://``,
  ``file://``, ``tauri://``, ``vscode-webview://`` and ``vscode-file://`` pages, and the globs of
  ``CORRAL_ORIGINS`` (``*`` alone: any origin). The gateway's own origin is also allowed (its
  console's calls) when its host is an IP address or a local name as above: a page on a name
  rebound to the gateway's address is not. An allowed origin gets CORS headers.

The I/O half (`corral.gateway.cors`) applies these to each request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

LOCAL_ORIGINS: Final = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
LOCAL_SUFFIXES: Final = (".localhost", ".local", ".internal")
# Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193, nothing else (Python's is_private is wider)
_PRIVATE: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_CACHE_MOST: Final = 256  # Host and Origin values remembered with their verdicts


def host_name(host: str) -> str:
    """The name or address of a ``Host`` header without its port (``[::1]:80`` → ``::1``); a
    bracketed address followed by anything but a port is returned whole (never local)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :] if end > 0 else ""
        if end > 0 and (rest == "" or re.fullmatch(r":[0-9]*", rest)):
            return host[1:end]
        return host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host  # no port, or an IPv6 address without brackets


def is_loopback(address: str) -> bool:
    """Whether a listen address (``127.0.0.1``, ``::1``, ``localhost``) is reachable only from here."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class Origins:
    """The rules for one gateway: where it listens, what this machine is called and its addresses,
    and the origins ``CORRAL_ORIGINS`` adds."""

    def __init__(
        self,
        extra: Iterable[str] = (),
        *,
        check_host: bool,
        hostname: str = "",
        addresses: Iterable[str] = (),
    ) -> None:
        patterns = [o.strip().lower().rstrip("/") for o in extra if o.strip()]
        self.any_origin = "*" in patterns
        self.patterns = tuple(LOCAL_ORIGINS) + tuple(p for p in patterns if p != "*")
        self._globs = tuple(_glob(p) for p in self.patterns)
        self.check_host = check_host
        self.hostname = hostname.lower()
        self.addresses = frozenset(a.lower() for a in addresses)
        self._hosts: dict[str, bool] = {}
        self._origins: dict[tuple[str, str], bool] = {}

    def local(self, name: str) -> bool:
        """Whether a host name (no port) is this machine or a local network's, as Ollama counts it."""
        if name in ("", "localhost") or name == self.hostname or name in self.addresses:
            return True
        if name.endswith(LOCAL_SUFFIXES):
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or ip.is_unspecified or any(ip in n for n in _PRIVATE))

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header (None: none) may be served."""
        if not self.check_host or not host:
            return True
        verdict = self._hosts.get(host)
        if verdict is None:
            verdict = self.local(host_name(host))
            _remember(self._hosts, host, verdict)
        return verdict

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a browser page of ``origin`` may call the gateway, reached as ``host``."""
        if self.any_origin:
            return True
        key = (origin, host or "")
        verdict = self._origins.get(key)
        if verdict is None:
            verdict = self._judge(origin.strip().lower(), (host or "").strip().lower())
            _remember(self._origins, key, verdict)
        return verdict

    def _judge(self, origin: str, host: str) -> bool:
        if any(g.fullmatch(origin) for g in self._globs):
            return True
        # its own origin (the console): only on an address or a local name, never a rebound one
        scheme, sep, rest = origin.partition("://")
        if not sep or scheme not in ("http", "https") or not host or rest != host:
            return False
        name = host_name(host)
        return _ip(name) is not None or self.local(name)


def _glob(pattern: str) -> re.Pattern[str]:
    """An origin pattern where only ``*`` is special (any run of characters), as Ollama matches
    them: ``[``, ``]`` and ``?`` are themselves (``http://[::1]:*``)."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _remember(cache: dict[str, bool] | dict[tuple[str, str], bool], key: object, verdict: bool) -> None:
    if len(cache) >= _CACHE_MOST:
        cache.clear()  # headers a client makes up cannot grow it
    cache[key] = verdict  # type: ignore[index]
