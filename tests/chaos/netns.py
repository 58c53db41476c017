"""Hosts for multi-host chaos tests: Linux network namespaces on one bridge, and real processes in them.

`Lan` builds a small network of its own and nothing outside it: a *hub* namespace holding a bridge
at ``192.0.2.254/24`` and, per host, a namespace joined to the bridge by a veth pair, at
``192.0.2.{n}/24``. The root namespace is left alone (the documentation range may well be the
machine's own network there). The test process reaches the hosts by moving its main thread into
the hub namespace (`Lan.entered`): every socket it opens meanwhile lives there. A host is cut off by
setting its hub-side veth down and brought back by setting it up, as a pulled cable would.

`Processes` runs each service as a real process inside a host (``ip netns exec``), keeps its output
and wakes waiters on each line; closing it stops every process (SIGTERM, then SIGKILL) and reaps it.
Names carry a random suffix, so runs side by side never share a namespace or an interface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tests.integration.waits import Changes, until

CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace
IP_TIMEOUT_S = 10.0  # one `ip` command
STOP_GRACE_S = 5.0  # SIGTERM → SIGKILL
SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737)
HUB_ADDRESS = f"{SUBNET}.254"

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class IpError(RuntimeError):
    """An ``ip`` command failed; the message is its own."""


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or a sandbox forbids it)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ip(*args: str) -> None:
    """Run ``ip args``; a failure raises with its message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise IpError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _pids(ns: str) -> list[int]:
    """The processes living in namespace ``ns`` (none if it does not exist)."""
    done = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    return [int(p) for p in done.stdout.split()]


class Lan:
    """The hub and its hosts (name → last address byte); a context manager that always tears down."""

    def __init__(self, hosts: dict[str, int]) -> None:
        sfx = secrets.token_hex(3)
        self.hub = f"corral-{sfx}-hub"
        self.bridge = f"cb{sfx}"  # interface names: at most 15 characters
        self.hosts = {name: f"corral-{sfx}-{name}" for name in hosts}
        self.addresses = {name: f"{SUBNET}.{n}" for name, n in hosts.items()}
        self._ports = {name: f"cv{sfx}{name}" for name in hosts}  # hub side of each veth pair
        self._made: list[str] = []

    def __enter__(self) -> Lan:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        try:
            self._add(self.hub)
        except (IpError, OSError, subprocess.TimeoutExpired) as e:
            self.close()  # a half-made namespace, if any
            raise NetnsUnavailable(str(e)) from e
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, ns: str) -> None:
        self._made.append(ns)  # before: a failed add may still leave its name behind
        ip("netns", "add", ns)

    def _build(self) -> None:
        hub = ("-n", self.hub)
        ip(*hub, "link", "set", "lo", "up")
        ip(*hub, "link", "add", self.bridge, "type", "bridge")
        ip(*hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", self.bridge)
        ip(*hub, "link", "set", self.bridge, "up")
        for name, ns in self.hosts.items():
            self._add(ns)
            port, end = self._ports[name], f"ce{self._ports[name][2:]}"
            ip(*hub, "link", "add", port, "type", "veth", "peer", "name", end, "netns", ns)
            ip(*hub, "link", "set", port, "master", self.bridge, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", end)
            ip("-n", ns, "link", "set", end, "up")

    def cut(self, host: str) -> None:
        """Pull host's cable: its traffic to everyone else is dropped from now on."""
        ip("-n", self.hub, "link", "set", self._ports[host], "down")

    def restore(self, host: str) -> None:
        ip("-n", self.hub, "link", "set", self._ports[host], "up")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread lives in the hub namespace inside this block (and back after it)."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.hub}") as hub:
            _setns(hub.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    async def run_in(self, host: str, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread of its own inside ``host``'s namespace (e.g. to reach a server bound
        to that host's loopback); the thread ends with it, so no pooled thread is left moved."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                with open(f"/run/netns/{self.hosts[host]}") as ns:
                    _setns(ns.fileno())
                done.set_result(fn())
            except BaseException as e:  # handed to the awaiting side, which re-raises it
                done.set_exception(e)

        threading.Thread(target=run, name=f"netns-{host}", daemon=True).start()
        return await asyncio.wrap_future(done)

    def close(self) -> None:
        """Kill whatever still runs in the namespaces (by pid) and delete them; the bridge and
        every veth pair go with them. Safe to call twice."""
        while self._made:
            ns = self._made.pop()
            for pid in _pids(ns):  # only ours: the namespace is this run's own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(IpError, OSError, subprocess.TimeoutExpired):
                ip("netns", "del", ns)


@dataclass
class Proc:
    """One service process: its output so far, and an event set on every new line."""

    name: str
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _line: Changes = field(default_factory=Changes)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._line.set()
        self._line.set()  # the end of the output wakes waiters too

    async def wait_line(self, text: str, timeout: float) -> None:
        """Until a line containing ``text`` was written; fails at once if the process ended."""

        def logged() -> bool:
            if any(text in line for line in self.lines):
                return True
            if self.process.stdout is not None and self.process.stdout.at_eof():
                raise AssertionError(f"{self.name} ended without logging {text!r}:\n{self.tail()}")
            return False

        await until(
            logged, self._line.wait, timeout=timeout, what=f"{self.name} logs {text!r}", state=self.tail
        )

    def tail(self, n: int = 40) -> str:
        return "\n".join(f"  [{self.name}] {line}" for line in self.lines[-n:])


class Processes:
    """Real processes inside hosts; an async context manager that stops and reaps every one."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[Proc] = []
        self._readers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Processes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, name: str, ns: str, module: str, args: Sequence[str]) -> Proc:
        """``python -m module args`` in namespace ``ns``, stdout and stderr together."""
        process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", module, *args,
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        proc = Proc(name, process)
        self.procs.append(proc)
        self._readers.append(asyncio.create_task(proc.read()))
        return proc

    def dump(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    async def stop(self, only: Sequence[Proc] | None = None) -> None:
        """SIGTERM every process still running (or those of ``only``), SIGKILL what is left after
        `STOP_GRACE_S`, reap them."""
        running = [p for p in (self.procs if only is None else only) if p.process.returncode is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.process.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.process.wait()) for p in running]
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_GRACE_S)
            for p in running:
                if p.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.process.kill()
            if late:
                await asyncio.wait(late, timeout=STOP_GRACE_S)
        if only is None and self._readers:
            await asyncio.wait(self._readers, timeout=STOP_GRACE_S)
            for r in self._readers:
                r.cancel()
