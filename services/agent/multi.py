"""The agents of a host with several Ollamas: one per Ollama container (`DockerAgents`) or one per
GPU's ``ollama serve`` (`SpawnedAgents`). Each adds and removes agents in an `AgentSet` as its
Ollamas come and go; `run` until `stop`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import msgspec
from corral.agent.agent import Agent
from corral.agent.agentset import AgentSet, agent_id
from corral.agent.docker import LOCAL_HOST, ContainerBackend, DockerWatch, EngineGone, require_docker
from corral.agent.gpu import GIB, SOURCE_AMD_SYSFS, SOURCE_CONFIG, SOURCE_NVML, GpuProbe, detect_vendor
from corral.agent.settings import AgentSettings
from corral.agent.spawn import OLLAMA, OllamaServe, ollama_env, ports
from corral.protocol.messages import Gpu
from corral.runtime.tasks import supervise

log = logging.getLogger(__name__)

_PROBED = (SOURCE_NVML, SOURCE_AMD_SYSFS)


class Probes:
    """One `GpuProbe` per vendor, opened on first use and closed together."""

    def __init__(self, vram_gb: float) -> None:
        self.vram_gb = vram_gb
        self._probes: dict[str, GpuProbe] = {}

    def reader(self, vendor: str, indices: tuple[int, ...] = ()) -> Callable[[], list[Gpu]]:
        """Re-reads this host's GPUs of ``vendor``: those of ``indices`` where the probe finds them,
        else all it finds (a configured size, system memory)."""
        if vendor not in self._probes:
            self._probes[vendor] = GpuProbe(vendor, vram_gb_override=self.vram_gb or None)
        probe = self._probes[vendor]

        def read() -> list[Gpu]:
            gpus = probe.refresh()
            mine = [g for g in gpus if g.index in indices and g.source in _PROBED]
            return mine or gpus

        return read

    def close(self) -> None:
        for probe in self._probes.values():
            probe.close()


class Agents(Protocol):
    async def run(self) -> None: ...

    async def stop(self) -> None: ...


class DockerAgents:
    """One agent per running Ollama container of the Docker engine, for as long as it runs; its id
    ``<host>-<container name>``."""

    def __init__(self, settings: AgentSettings, agents: AgentSet, probes: Probes) -> None:
        self.settings = settings
        self.agents = agents
        self.probes = probes
        self.host = settings.advertise_host or settings.id
        self.watch = DockerWatch(
            settings.docker_host,
            network=settings.docker_network,
            default_parallel=settings.parallel,
            on_up=self._up,
            on_down=self._down,
        )

    async def run(self) -> None:
        require_docker()
        import docker

        # an engine that stops, restarts or is not there yet: one line a try, followed again
        away = (EngineGone, docker.errors.DockerException, OSError)
        await supervise(f"the Docker watch of {self.watch.engine}", self.watch.run, expected=away)

    async def stop(self) -> None:
        """Nothing of its own to stop: cancelling `run` closes the events stream."""

    async def _up(self, b: ContainerBackend) -> None:
        s = msgspec.structs.replace(
            self.settings,
            id=agent_id(self.host, b.name),
            ollama_url=b.url,
            vendor=b.vendor,
            parallel=b.parallel,
            context_length=b.context_length or self.settings.context_length,
        )
        # a remote engine's GPUs are not this host's: only a configured size then
        local = self.watch.engine == LOCAL_HOST
        probe = self.probes.reader(b.vendor, b.gpu_ids) if local or self.settings.vram_gb else None
        await self.agents.add(Agent(s, probe=probe))

    async def _down(self, b: ContainerBackend) -> None:
        self.agents.remove(agent_id(self.host, b.name))


class SpawnedAgents:
    """One supervised ``ollama serve`` per GPU, and an agent ``<host>-gpu<N>`` beside each while it
    runs. ``environ`` is the environment the Ollamas start from (the agent's own)."""

    def __init__(
        self, settings: AgentSettings, agents: AgentSet, probes: Probes, *, environ: Mapping[str, str]
    ) -> None:
        self.settings = msgspec.structs.replace(settings, vendor=settings.vendor or detect_vendor())
        self.agents = agents
        self.probes = probes
        self.environ = environ
        self.host = settings.advertise_host or settings.id
        self.serves: list[OllamaServe] = []
        self._stopping = False

    async def run(self) -> None:
        s = self.settings
        found = await asyncio.to_thread(self.probes.reader(s.vendor))  # opens NVML before agents share it
        indices = list(range(s.gpus)) or [g.index for g in found if g.source in _PROBED]
        if not indices:
            which = "no GPU (NVIDIA or AMD)" if s.vendor == "cpu" else f"no {s.vendor} GPU"
            raise RuntimeError(f"--spawn: {which} found; give --gpus N to serve GPUs 0..N-1")
        if shutil.which(OLLAMA, path=self.environ.get("PATH")) is None:  # else it fails, again and again
            raise RuntimeError(
                f"--spawn: no `{OLLAMA}` on PATH to start; install Ollama: https://ollama.com/download"
            )
        for gpu, port in zip(indices, ports(s.spawn_port, len(indices)), strict=True):
            env = ollama_env(
                self.environ,
                vendor=s.vendor,
                gpu=gpu,
                port=port,
                parallel=s.parallel,
                max_loaded_models=s.max_loaded_models,
                models_dir=s.models_dir,
                context_length=s.context_length,
            )
            agent = msgspec.structs.replace(
                s, id=agent_id(self.host, f"gpu{gpu}"), ollama_url=f"http://127.0.0.1:{port}"
            )
            self.serves.append(
                OllamaServe(gpu, env, on_up=self._on_up(agent, gpu), on_down=self._on_down(agent.id))
            )
        log.info(
            "serving %d %s GPU(s) on ports %s",
            len(indices),
            s.vendor,
            [p.env["OLLAMA_HOST"] for p in self.serves],
        )
        if self._stopping:
            return
        async with asyncio.TaskGroup() as tg:
            for serve in self.serves:
                tg.create_task(serve.run(), name=f"ollama-gpu{serve.gpu}")

    async def stop(self) -> None:
        """Stop the Ollamas (their agents should have drained first); `run` then returns."""
        self._stopping = True
        await asyncio.gather(*(serve.stop() for serve in self.serves))

    def _on_up(self, settings: AgentSettings, gpu: int) -> Callable[[], Awaitable[None]]:
        async def up() -> None:
            if settings.vram_gb:  # this GPU's configured size; its free VRAM is what Ollama leaves
                total = int(settings.vram_gb * GIB)
                name = f"{settings.vendor} GPU {gpu} ({settings.vram_gb:g} GiB configured)"
                gpus = [Gpu(index=gpu, name=name, vendor=settings.vendor, vram_total=total,
                            vram_free=total, source=SOURCE_CONFIG)]  # fmt: skip
                await self.agents.add(Agent(settings, gpus=gpus))
            else:
                await self.agents.add(Agent(settings, probe=self.probes.reader(settings.vendor, (gpu,))))

        return up

    def _on_down(self, agent: str) -> Callable[[], Awaitable[None]]:
        async def down() -> None:
            self.agents.remove(agent)

        return down
