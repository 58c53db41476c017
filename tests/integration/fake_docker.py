"""A stand-in Docker engine: the Docker Engine API's JSON over a unix socket, for the real `docker`
client. It serves what discovery reads — ``GET /version``, ``/_ping``, ``/containers/json``,
``/containers/{id}/json`` and the ``/events`` stream (newline-delimited JSON) — with documents
shaped as https://docs.docker.com/reference/api/engine/ describes them (ContainerSummary,
ContainerInspectResponse, EventMessage). `start` and `stop` change a container's state and emit the
events a real engine emits for ``docker start`` and ``docker stop``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
from typing import Any

from aiohttp import web

API_VERSION = "1.47"


def container(
    name: str,
    image: str = "ollama/ollama:latest",
    *,
    host_port: int | None = None,
    networks: dict[str, str] | None = None,
    env: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
    nvidia: bool = False,
    device_ids: list[str] | None = None,
    kfd: bool = False,
) -> dict[str, Any]:
    """A container's inspect document (``GET /containers/{id}/json``), as ``docker run`` with
    ``-p host_port:11434``, ``--gpus`` (``nvidia``) or ``--device /dev/kfd`` leaves it, running."""
    cid = hashlib.sha256(name.encode()).hexdigest()
    networks = {"bridge": "172.17.0.2"} if networks is None else networks
    ports: dict[str, Any] = {"11434/tcp": None}
    bindings: dict[str, Any] = {}
    if host_port is not None:
        ports["11434/tcp"] = [
            {"HostIp": "0.0.0.0", "HostPort": str(host_port)},
            {"HostIp": "::", "HostPort": str(host_port)},
        ]
        bindings["11434/tcp"] = [{"HostIp": "", "HostPort": str(host_port)}]
    device_requests = None
    if nvidia:
        device_requests = [
            {
                "Driver": "",
                "Count": -1 if device_ids is None else 0,
                "DeviceIDs": device_ids,
                "Capabilities": [["gpu"]],
                "Options": {},
            }
        ]
    devices = [
        {"PathOnHost": path, "PathInContainer": path, "CgroupPermissions": "rwm"}
        for path in (("/dev/kfd", "/dev/dri") if kfd else ())
    ]
    return {
        "Id": cid,
        "Created": "2025-01-20T10:00:00.000000000Z",
        "Path": "/bin/ollama",
        "Args": ["serve"],
        "State": {
            "Status": "running",
            "Running": True,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": False,
            "Dead": False,
            "Pid": 4242,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": "2025-01-20T10:00:01.000000000Z",
            "FinishedAt": "0001-01-01T00:00:00Z",
        },
        "Image": "sha256:" + hashlib.sha256(image.encode()).hexdigest(),
        "Name": "/" + name,
        "RestartCount": 0,
        "Driver": "overlay2",
        "Platform": "linux",
        "HostConfig": {
            "NetworkMode": "bridge",
            "PortBindings": bindings,
            "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
            "Runtime": "runc",
            "Devices": devices,
            "DeviceRequests": device_requests,
        },
        "Config": {
            "Hostname": cid[:12],
            "ExposedPorts": {"11434/tcp": {}},
            "Env": [
                *env,
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "OLLAMA_HOST=0.0.0.0:11434",
            ],  # fmt: skip
            "Cmd": ["serve"],
            "Image": image,
            "Entrypoint": ["/bin/ollama"],
            "Labels": labels or {},
        },
        "NetworkSettings": {
            "SandboxID": hashlib.sha256(cid.encode()).hexdigest(),
            "SandboxKey": "/var/run/docker/netns/" + cid[:12],
            "Ports": ports,
            "Networks": {
                net: {
                    "IPAMConfig": None,
                    "Links": None,
                    "Aliases": None,
                    "MacAddress": "02:42:ac:11:00:02",
                    "NetworkID": hashlib.sha256(net.encode()).hexdigest(),
                    "EndpointID": hashlib.sha256((net + cid).encode()).hexdigest(),
                    "Gateway": ip.rsplit(".", 1)[0] + ".1",
                    "IPAddress": ip,
                    "IPPrefixLen": 16,
                    "IPv6Gateway": "",
                    "GlobalIPv6Address": "",
                    "GlobalIPv6PrefixLen": 0,
                    "DNSNames": None,
                }
                for net, ip in networks.items()
            },
        },
    }


def summary(inspect: dict[str, Any]) -> dict[str, Any]:
    """The container as ``GET /containers/json`` lists it (ContainerSummary)."""
    ports = []
    for key, bindings in (inspect["NetworkSettings"]["Ports"] or {}).items():
        private, _, proto = key.partition("/")
        for b in bindings or [{}]:
            port = {"PrivatePort": int(private), "Type": proto}
            if b:
                port |= {"IP": b["HostIp"], "PublicPort": int(b["HostPort"])}
            ports.append(port)
    running = inspect["State"]["Running"]
    return {
        "Id": inspect["Id"],
        "Names": [inspect["Name"]],
        "Image": inspect["Config"]["Image"],
        "ImageID": inspect["Image"],
        "Command": "/bin/ollama serve",
        "Created": 1737367200,
        "Ports": ports,
        "Labels": inspect["Config"]["Labels"],
        "State": inspect["State"]["Status"],
        "Status": "Up 5 seconds" if running else "Exited (0) 2 seconds ago",
        "HostConfig": {"NetworkMode": inspect["HostConfig"]["NetworkMode"]},
        "NetworkSettings": {"Networks": inspect["NetworkSettings"]["Networks"]},
        "Mounts": [],
    }


class FakeDockerEngine:
    """Serves containers (inspect documents) on ``socket_path`` until `stop`."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.containers: dict[str, dict[str, Any]] = {}
        self._listeners: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self.requests: list[str] = []  # the paths asked, in order
        self._runner: web.AppRunner | None = None
        self.subscribed = asyncio.Event()  # an /events stream is open
        self._network: dict[str, dict[str, Any]] = {}  # a container's NetworkSettings while it runs

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    async def start(self) -> None:
        app = web.Application()
        for prefix in ("", "/v{version}"):
            app.router.add_get(prefix + "/version", self._version)
            app.router.add_get(prefix + "/_ping", self._ping)
            app.router.add_get(prefix + "/containers/json", self._list)
            app.router.add_get(prefix + "/containers/{id}/json", self._inspect)
            app.router.add_get(prefix + "/events", self._events)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.socket_path).start()

    async def stop(self) -> None:
        for q in list(self._listeners):
            q.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add(self, inspect: dict[str, Any], *, running: bool = True) -> str:
        """A container (made by `container`) that exists before anyone looks, running or exited."""
        cid = str(inspect["Id"])
        self.containers[cid] = inspect
        self._network[cid] = copy.deepcopy(inspect["NetworkSettings"])
        if not running:
            self._exited(cid)
        return cid

    def start_container(self, cid: str) -> None:
        """``docker start``: it runs, with its ports and addresses back, and "start" is emitted."""
        c = self.containers[cid]
        c["State"] |= {
            "Status": "running",
            "Running": True,
            "Pid": 4243,
            "FinishedAt": "0001-01-01T00:00:00Z",
        }
        c["NetworkSettings"] = copy.deepcopy(self._network[cid])
        self._emit(cid, "start")

    def stop_container(self, cid: str) -> None:
        """``docker stop``: "kill" (SIGTERM sent), then "die" once it exited, then "stop"."""
        self._emit(cid, "kill", signal="15")
        self._exited(cid)
        self._emit(cid, "die", exitCode="0")
        self._emit(cid, "stop")

    def _exited(self, cid: str) -> None:
        c = self.containers[cid]
        c["State"] |= {"Status": "exited", "Running": False, "Pid": 0, "ExitCode": 0,
                       "FinishedAt": "2025-01-20T10:05:00.000000000Z"}  # fmt: skip
        c["NetworkSettings"]["Ports"] = {}
        for endpoint in c["NetworkSettings"]["Networks"].values():
            endpoint |= {"IPAddress": "", "Gateway": "", "IPPrefixLen": 0, "MacAddress": ""}

    def _emit(self, cid: str, action: str, **extra: str) -> None:
        c = self.containers[cid]
        now = time.time_ns()
        attributes = {**c["Config"]["Labels"], "image": c["Config"]["Image"], "name": c["Name"][1:], **extra}
        event = {
            "status": action,
            "id": cid,
            "from": c["Config"]["Image"],
            "Type": "container",
            "Action": action,
            "Actor": {"ID": cid, "Attributes": attributes},
            "scope": "local",
            "time": now // 10**9,
            "timeNano": now,
        }
        for q in self._listeners:
            q.put_nowait(event)

    async def _version(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        return web.json_response(
            {
                "Platform": {"Name": "Docker Engine - Community"},
                "Version": "27.3.1",
                "ApiVersion": API_VERSION,
                "MinAPIVersion": "1.24",
                "GitCommit": "41ca978",
                "GoVersion": "go1.22.7",
                "Os": "linux",
                "Arch": "amd64",
                "KernelVersion": "6.8.0-48-generic",
                "BuildTime": "2024-09-20T11:41:11.000000000+00:00",
            },
            headers={"Api-Version": API_VERSION},
        )

    async def _ping(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        return web.Response(text="OK", headers={"Api-Version": API_VERSION})

    async def _list(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        filters = json.loads(request.query.get("filters", "{}"))
        everything = request.query.get("all") in ("1", "true", "True")
        out = []
        for c in self.containers.values():
            status = c["State"]["Status"]
            if "status" in filters and status not in filters["status"]:
                continue
            if not everything and "status" not in filters and status != "running":
                continue
            out.append(summary(c))
        return web.json_response(out)

    async def _inspect(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        c = self.containers.get(request.match_info["id"])
        if c is None:
            message = f"No such container: {request.match_info['id']}"
            return web.json_response({"message": message}, status=404)
        return web.json_response(c)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        filters = json.loads(request.query.get("filters", "{}"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            await response.prepare(request)
            self.subscribed.set()
            while (event := await queue.get()) is not None:
                if "type" in filters and event["Type"] not in filters["type"]:
                    continue
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self._listeners.discard(queue)
            raise
        self._listeners.discard(queue)
        return response
