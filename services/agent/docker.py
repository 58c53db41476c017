"""Docker discovery: one agent per running Ollama container of a Docker engine.

Two parts. The pure one reads a container's inspect document (``GET /containers/{id}/json``, see
https://docs.docker.com/reference/api/engine/) and says whether it is an Ollama and how to reach
it (`backend_of`):

- an Ollama: its image is ``ollama/ollama`` (any tag, any registry) or it carries the label
  ``corral.ollama=true``; ``corral.ollama=false`` leaves an ``ollama/ollama`` container out;
- its URL: the address on ``network`` when one is named (the agent shares that network with it),
  else the host port published for Ollama's port, else its address on its first network;
  Ollama's port is 11434 unless the container's ``OLLAMA_HOST`` says otherwise;
- its vendor: NVIDIA for a GPU device request (``--gpus``) or the ``nvidia`` runtime, AMD when
  ``/dev/kfd`` is mapped in or the image is a ``:rocm`` one, else CPU;
- its slots: the container's ``OLLAMA_NUM_PARALLEL`` (else the agent's ``parallel``), its
  context: ``OLLAMA_CONTEXT_LENGTH``; its GPUs: the device ids it was given, if any.

The I/O part, `DockerWatch`, follows the engine with the ``docker`` package: it opens the events
stream first, then lists the running containers and inspects each (so nothing that starts between
the two is missed), then turns each container event into ``on_up``/``on_down`` calls. The package
blocks, so every call runs in a thread; the events stream is read by a thread that hands each event
to the event loop, and closing the stream ends that thread. A stream that ends (the engine
restarted) raises `EngineGone`; the caller's supervisor runs the watch again, which lists afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

OLLAMA_PORT = 11434
LABEL = "corral.ollama"
LOCAL_HOST = "127.0.0.1"

# container events after which it serves (inspect it) and after which it does not (drop it)
UP_ACTIONS = frozenset({"start", "unpause"})
DOWN_ACTIONS = frozenset({"die", "stop", "pause", "destroy"})  # "kill" only sends a signal


@dataclass(frozen=True)
class ContainerBackend:
    """An Ollama container as an agent serves it."""

    container_id: str
    name: str  # without Docker's leading "/"
    url: str
    vendor: str
    parallel: int
    context_length: int = 0  # its OLLAMA_CONTEXT_LENGTH; 0 = Ollama's rule
    gpu_ids: tuple[int, ...] = ()  # the GPUs it was given by index; () = all or unknown


# -- the pure part --------------------------------------------------------------------------------
def engine_host(docker_host: str) -> str:
    """Where an engine's published ports are reached: the host of a ``tcp://``, ``http(s)://`` or
    ``ssh://`` engine, else this host (a unix socket or a named pipe)."""
    parts = urlsplit(docker_host)
    if parts.scheme in ("tcp", "http", "https", "ssh") and parts.hostname:
        return parts.hostname
    return LOCAL_HOST


def env_of(inspect: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment (``Config.Env``, ``NAME=value`` strings) as a dict."""
    pairs = (item.partition("=") for item in (inspect.get("Config") or {}).get("Env") or ())
    return {name: value for name, _, value in pairs}


def is_ollama(image: str, labels: Mapping[str, str]) -> bool:
    """An ``ollama/ollama`` image (``docker.io/ollama/ollama:rocm``, ``ollama/ollama@sha256:…``) or
    the ``corral.ollama=true`` label; ``corral.ollama=false`` opts out."""
    label = labels.get(LABEL, "").strip().lower()
    if label in ("false", "0", "no"):
        return False
    if label in ("true", "1", "yes"):
        return True
    repository = image.split("@")[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    return repository == "ollama/ollama" or repository.endswith("/ollama/ollama")


def vendor_of(inspect: Mapping[str, Any]) -> str:
    host = inspect.get("HostConfig") or {}
    for request in host.get("DeviceRequests") or ():
        capabilities = {c for group in request.get("Capabilities") or () for c in group}
        if request.get("Driver") == "nvidia" or "gpu" in capabilities:
            return "nvidia"
    if host.get("Runtime") == "nvidia":
        return "nvidia"
    devices = {d.get("PathOnHost") for d in host.get("Devices") or ()}
    image = str((inspect.get("Config") or {}).get("Image") or "").split("@")[0]
    tag = image.rsplit("/", 1)[-1].partition(":")[2]  # "rocm", "0.5.7-rocm"
    if "/dev/kfd" in devices or "rocm" in tag.replace("_", "-").split("-"):
        return "amd"
    return "cpu"


def gpu_ids_of(inspect: Mapping[str, Any]) -> tuple[int, ...]:
    """The GPU indices of its device requests (``--gpus '"device=0,1"'``); () = all or by UUID."""
    ids: list[int] = []
    for request in (inspect.get("HostConfig") or {}).get("DeviceRequests") or ():
        for device in request.get("DeviceIDs") or ():
            if not str(device).isdigit():
                return ()
            ids.append(int(device))
    return tuple(sorted(set(ids)))


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def ollama_port(env: Mapping[str, str]) -> int:
    """The port Ollama listens on inside the container: its ``OLLAMA_HOST``'s, else 11434."""
    host = env.get("OLLAMA_HOST", "")
    if not host:
        return OLLAMA_PORT
    try:
        port = urlsplit(host if "://" in host else f"http://{host}").port
    except ValueError:
        return OLLAMA_PORT
    return port or OLLAMA_PORT


def url_of(inspect: Mapping[str, Any], *, engine: str, network: str = "") -> str | None:
    """How the agent reaches the container's Ollama; None when it cannot (nothing published and
    no address, or not on ``network``)."""
    port = ollama_port(env_of(inspect))
    settings = inspect.get("NetworkSettings") or {}
    networks: Mapping[str, Any] = settings.get("Networks") or {}
    if network:
        address = (networks.get(network) or {}).get("IPAddress")
        return f"http://{address}:{port}" if address else None
    bindings = (settings.get("Ports") or {}).get(f"{port}/tcp") or ()
    for binding in sorted(bindings, key=lambda b: ":" in str(b.get("HostIp", ""))):  # IPv4 first
        if binding.get("HostPort"):
            ip = str(binding.get("HostIp") or "")
            host = engine if ip in ("", "0.0.0.0", "::") else f"[{ip}]" if ":" in ip else ip
            return f"http://{host}:{binding['HostPort']}"
    for name in sorted(networks):
        address = (networks[name] or {}).get("IPAddress")
        if address:
            return f"http://{address}:{port}"
    return None


def backend_of(
    inspect: Mapping[str, Any], *, engine: str = LOCAL_HOST, network: str = "", default_parallel: int = 1
) -> ContainerBackend | None:
    """The running Ollama container ``inspect`` describes, as an agent serves it; None for any other
    container, a stopped or paused one, or one the agent cannot reach."""
    state = inspect.get("State") or {}
    if not state.get("Running") or state.get("Paused"):
        return None
    config = inspect.get("Config") or {}
    if not is_ollama(str(config.get("Image") or ""), config.get("Labels") or {}):
        return None
    url = url_of(inspect, engine=engine, network=network)
    name = str(inspect.get("Name") or inspect.get("Id", "")[:12]).lstrip("/")
    if url is None:
        log.warning("Ollama container %s is not reachable: no published port and no address", name)
        return None
    env = env_of(inspect)
    return ContainerBackend(
        container_id=str(inspect["Id"]),
        name=name,
        url=url,
        vendor=vendor_of(inspect),
        parallel=max(1, _int(env.get("OLLAMA_NUM_PARALLEL"), default_parallel)),
        context_length=max(0, _int(env.get("OLLAMA_CONTEXT_LENGTH"), 0)),
        gpu_ids=gpu_ids_of(inspect),
    )


# -- the I/O part ---------------------------------------------------------------------------------
class EngineGone(ConnectionError):
    """The Docker events stream ended: the engine stopped or restarted."""


def require_docker() -> None:
    """Raise `RuntimeError` saying what to install when the ``docker`` package is missing."""
    try:
        import docker  # noqa: F401
    except ImportError:
        raise RuntimeError("--docker needs the `docker` package: pip install docker") from None


def docker_client(docker_host: str) -> Any:
    """A low-level client of ``docker_host``, else of ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY`` and
    ``DOCKER_CERT_PATH``) as the ``docker`` package reads it; the API version is the engine's."""
    import docker

    if docker_host:
        return docker.APIClient(base_url=docker_host, version="auto")
    return docker.APIClient(version="auto", **docker.utils.kwargs_from_env())


def default_docker_host(docker_host: str) -> str:
    """The engine a client of ``docker_host`` talks to (for `engine_host`)."""
    if docker_host:
        return docker_host
    import docker

    return str(docker.utils.kwargs_from_env().get("base_url") or "unix:///var/run/docker.sock")


class DockerWatch:
    """Follows one Docker engine; calls ``on_up`` for each Ollama container that runs (again after
    a change of address) and ``on_down`` for each that stopped. `run` returns never:
    it raises `EngineGone` or the ``docker`` package's error when the engine goes away."""

    def __init__(
        self,
        docker_host: str,
        *,
        network: str,
        default_parallel: int,
        on_up: Callable[[ContainerBackend], Awaitable[None]],
        on_down: Callable[[ContainerBackend], Awaitable[None]],
    ) -> None:
        self.docker_host = docker_host
        self.engine = engine_host(default_docker_host(docker_host))
        self.network = network
        self.default_parallel = default_parallel
        self._on_up = on_up
        self._on_down = on_down
        self.serving: dict[str, ContainerBackend] = {}  # container id → what its agent serves

    async def run(self) -> None:
        client = await asyncio.to_thread(docker_client, self.docker_host)
        try:
            stream = await asyncio.to_thread(client.events, decode=True, filters={"type": "container"})
            events: asyncio.Queue[Mapping[str, Any] | None] = asyncio.Queue()
            reader = threading.Thread(
                target=_pump, args=(stream, asyncio.get_running_loop(), events), daemon=True
            )
            reader.start()
            try:
                running = await asyncio.to_thread(client.containers, filters={"status": "running"})
                await self._resync(client, [str(c["Id"]) for c in running])
                log.info("following Docker at %s: %d Ollama container(s)", self.engine, len(self.serving))
                while (event := await events.get()) is not None:
                    await self._on_event(client, event)
                raise EngineGone("the Docker events stream ended")
            finally:
                with contextlib.suppress(OSError):
                    stream.close()  # the reader thread's read ends
                await asyncio.to_thread(reader.join, 10)
        finally:
            client.close()

    async def _resync(self, client: Any, running: list[str]) -> None:
        found = {}
        for container_id in running:
            backend = await self._inspect(client, container_id)
            if backend is not None:
                found[container_id] = backend
        for container_id in [c for c in self.serving if c not in found]:
            await self._down(container_id)
        for backend in found.values():
            await self._up(backend)

    async def _on_event(self, client: Any, event: Mapping[str, Any]) -> None:
        if event.get("Type", "container") != "container":
            return
        action = str(event.get("Action") or event.get("status") or "")
        container_id = str((event.get("Actor") or {}).get("ID") or event.get("id") or "")
        if not container_id:
            return
        if action in DOWN_ACTIONS:
            await self._down(container_id)
        elif action in UP_ACTIONS:
            backend = await self._inspect(client, container_id)
            if backend is not None:
                await self._up(backend)

    async def _inspect(self, client: Any, container_id: str) -> ContainerBackend | None:
        import docker

        try:
            inspect = await asyncio.to_thread(client.inspect_container, container_id)
        except docker.errors.NotFound:
            return None  # gone again before we looked
        return backend_of(
            inspect, engine=self.engine, network=self.network, default_parallel=self.default_parallel
        )

    async def _up(self, backend: ContainerBackend) -> None:
        known = self.serving.get(backend.container_id)
        if known == backend:
            return
        if known is not None:
            await self._down(backend.container_id)  # same container, new address or settings
        self.serving[backend.container_id] = backend
        await self._on_up(backend)

    async def _down(self, container_id: str) -> None:
        backend = self.serving.pop(container_id, None)
        if backend is not None:
            await self._on_down(backend)


def _pump(
    stream: Iterator[Mapping[str, Any]],
    loop: asyncio.AbstractEventLoop,
    events: asyncio.Queue[Mapping[str, Any] | None],
) -> None:
    """In a thread: hand each event to the loop; None once the stream ends (or is closed)."""
    try:
        for event in stream:
            loop.call_soon_threadsafe(events.put_nowait, event)
    except Exception:
        log.exception("reading Docker events failed")
    finally:
        with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is waiting
            loop.call_soon_threadsafe(events.put_nowait, None)
