"""A network namespace with only loopback, for a peer router's run: made by `Namespace` (``ip netns
add``, loopback up), the commands that run inside it built by `exec_argv`, and on close every
process still in it killed by pid and the namespace deleted, on success, error or Ctrl-C alike."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess

IP_TIMEOUT_S = 10.0


class NamespaceUnavailable(RuntimeError):
    """A namespace cannot be made here (not root, no ``ip``, or a sandbox forbids it)."""


def ip(*args: str) -> str:
    """``ip args``; its output, or `NamespaceUnavailable` with its message."""
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NamespaceUnavailable(f"ip {' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise NamespaceUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str:
    """Why a namespace cannot be made here, or ``""`` when it can be tried."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return ""


def exec_argv(ns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


class Namespace:
    """A fresh namespace named ``{prefix}-{random}`` with loopback up; a context manager that always
    removes it with everything still running inside."""

    def __init__(self, prefix: str = "corral-bench") -> None:
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        self._made = False

    def __enter__(self) -> Namespace:
        why = unavailable()
        if why:
            raise NamespaceUnavailable(why)
        self._made = True  # before: a failed add may still leave its name behind
        try:
            ip("netns", "add", self.name)
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pids(self) -> list[int]:
        """The processes living in the namespace (none once it is gone)."""
        with contextlib.suppress(NamespaceUnavailable):
            return [int(p) for p in ip("netns", "pids", self.name).split()]
        return []

    def close(self) -> None:
        """SIGKILL whatever still runs inside (only this run's own: the namespace is ours), then
        delete it. Safe to call twice."""
        if not self._made:
            return
        self._made = False
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(NamespaceUnavailable):
            ip("netns", "del", self.name)
