"""``corral up``: the whole fleet in one process — embedded NATS, simulated or real Ollamas, one
agent per backend, and the gateway — started in order and drained in reverse on Ctrl-C/SIGTERM.

`LocalFleet` is also what the integration tests and benchmarks start, so the demo is the tested path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
from corral.agent.agent import Agent
from corral.agent.gpu import GpuProbe
from corral.agent.settings import AgentSettings
from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.gateway.app import Gateway
from corral.gateway.settings import GatewaySettings
from corral.protocol.messages import Gpu
from corral.protocol.names import VENDORS
from corral.registry.registry import Registry
from corral.registry.settings import RegistrySettings
from corral.routing import Router
from corral.runtime.logs import setup_logging
from corral.runtime.natsserver import NatsPortTaken, NatsServer, NatsServerError
from corral.runtime.process import AsgiServer, run, wait_for_signal
from corral.runtime.settings import (
    CommonSettings,
    LogLevel,
    SettingsError,
    add_argument,
    describe,
    load_settings,
)
from corral.runtime.tasks import cancel_and_wait
from corral.simulator import SimConfig, SimServer, load_config
from corral.simulator.config import GIB
from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

# what `corral up` simulates with no backends given: a mixed NVIDIA/AMD fleet
DEFAULT_SIMS: tuple[dict[str, Any], ...] = (
    {"vendor": "nvidia", "gpus": [{"name": "RTX 4090", "vram_gb": 24}], "speed": 1.0},
    {"vendor": "amd", "gpus": [{"name": "Radeon RX 7900 XTX", "vram_gb": 24}], "speed": 0.9},
    {"vendor": "nvidia", "gpus": [{"name": "RTX 4080", "vram_gb": 16}], "speed": 0.8},
    {"vendor": "amd", "gpus": [{"name": "Radeon PRO W7800", "vram_gb": 32}], "speed": 0.85},
)


@dataclass
class Backend:
    url: str
    vendor: str = "cpu"
    parallel: int = 1
    context_length: int = 0  # the backend's OLLAMA_CONTEXT_LENGTH (0 = Ollama's default rule)
    gpus: list[Gpu] | None = None  # known GPUs (a simulator's); None = probe this host


@dataclass
class FleetOptions:
    # 16 attributes: the whole fleet of one `corral up`, in one place: where the gateway listens,
    # NATS (embedded or not, its store), the backends, each service's settings, and test hooks.
    host: str = "127.0.0.1"
    port: int = 11434
    nats_url: str = ""  # empty = start an embedded nats-server
    nats_port: int = 0  # 0 = a free port
    store_dir: str = ""  # the embedded nats-server's JetStream store; empty = a temporary one
    root: str = "corral"
    sims: list[SimConfig] = field(default_factory=list)
    backends: list[Backend] = field(default_factory=list)
    gateway: dict[str, Any] = field(default_factory=dict)  # extra GatewaySettings fields
    agent: dict[str, Any] = field(default_factory=dict)  # extra AgentSettings fields
    registry: dict[str, Any] | None = field(default_factory=dict)  # RegistrySettings fields; None = none
    aggregator: dict[str, Any] | None = field(default_factory=dict)  # AggregatorSettings; None = none
    log_level: LogLevel = "INFO"
    http_grace_s: int = 5  # on stop, how long open HTTP requests may finish
    tracer_provider: TracerProvider | None = None  # tests collect spans with their own provider
    router: Router | None = None  # the gateway's routing state; Router(seed=N): a reproducible `random`


class LocalFleet:
    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.nats: NatsServer | None = None
        self.nats_url = options.nats_url
        self.sims: list[SimServer] = []
        self.agents: list[Agent] = []
        self._agent_tasks: list[asyncio.Task[None]] = []
        self.gateway: Gateway | None = None
        self.http: AsgiServer | None = None
        self.registry: Registry | None = None
        self._probes: list[GpuProbe] = []
        self.aggregator: Aggregator | None = None

    @property
    def url(self) -> str:
        assert self.http is not None
        return self.http.url

    async def start(self) -> None:
        o = self.options
        try:
            if not self.nats_url:
                self.nats = NatsServer(port=o.nats_port, store_dir=o.store_dir or None)
                await self.nats.start()
                self.nats_url = self.nats.url
            common = {"nats_url": self.nats_url, "root": o.root, "log_level": o.log_level}
            if o.registry is not None:
                self.registry = Registry(RegistrySettings(**(common | o.registry)))
                await self.registry.start()
            if o.aggregator is not None:
                self.aggregator = Aggregator(AggregatorSettings(**(common | o.aggregator)))
                await self.aggregator.start()
            backends = list(o.backends)
            for cfg in o.sims:
                sim = SimServer(cfg, host="127.0.0.1", port=0)
                await sim.start()
                self.sims.append(sim)
                backends.append(
                    Backend(sim.url, cfg.vendor, cfg.num_parallel, cfg.context_length, sim_gpus(cfg))
                )
            for i, b in enumerate(backends):
                await self.add_agent(b, agent_id=f"{b.vendor}-{i}")
            gw_settings = GatewaySettings(
                nats_url=self.nats_url,
                root=o.root,
                host=o.host,
                port=o.port,
                log_level=o.log_level,
                **o.gateway,
            )
            self.gateway = Gateway(gw_settings, router=o.router, tracer_provider=o.tracer_provider)
            self.http = AsgiServer(
                self.gateway,
                o.host,
                o.port,
                log_level="warning",
                graceful_s=o.http_grace_s,
                header_timeout_s=gw_settings.header_timeout_s,
                tls_cert=gw_settings.tls_cert,
                tls_key=gw_settings.tls_key,
            )
            await self.http.start()
        except BaseException:
            await self.stop()
            raise

    async def add_agent(self, backend: Backend, *, agent_id: str, gpus: list[Gpu] | None = None) -> Agent:
        fields: dict[str, Any] = {
            "nats_url": self.nats_url,
            "root": self.options.root,
            "id": agent_id,
            "ollama_url": backend.url,
            "vendor": backend.vendor,
            "parallel": backend.parallel,
            "context_length": backend.context_length,
            "log_level": self.options.log_level,
        }
        settings = AgentSettings(**(fields | self.options.agent))  # explicit agent options win
        gpus = gpus if gpus is not None else backend.gpus
        probe = None
        if gpus is None:  # a real backend on this host: read its GPUs like `corral agent` does
            gpu_probe = GpuProbe(backend.vendor, vram_gb_override=settings.vram_gb or None)
            self._probes.append(gpu_probe)
            probe = gpu_probe.refresh
        agent = Agent(settings, gpus=gpus, probe=probe, tracer_provider=self.options.tracer_provider)
        task = asyncio.create_task(agent.run(), name=f"agent-{agent_id}")
        ready = asyncio.create_task(agent.ready.wait())
        await asyncio.wait((task, ready), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises why it could not start
            raise RuntimeError(f"agent {agent_id} stopped during start")
        self.agents.append(agent)
        self._agent_tasks.append(task)
        return agent

    async def stop(self) -> None:
        """Reverse order: stop taking HTTP, drain agents, stop backends, stop NATS. Idempotent.

        Every step is bounded: one that overruns is logged by name and left behind, so a stuck
        component can never hang the whole fleet's shutdown.
        """
        if self.http is not None:
            if self.gateway is not None:
                self.gateway.begin_stop(self.http.grace_s)
            await _bounded("the HTTP server", self.http.stop(), self.options.http_grace_s + 5)
            self.http = None
        grace = max((a.settings.drain_grace_s for a in self.agents), default=0.0)
        await asyncio.gather(
            *(_bounded(f"agent {a.id}", a.stop(), grace + 10) for a in self.agents), return_exceptions=True
        )
        for t in self._agent_tasks:
            if not t.done():
                t.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t
        self.agents.clear()
        self._agent_tasks.clear()
        for sim in self.sims:
            await _bounded("a simulator", sim.stop(), 10)
        self.sims.clear()
        for probe in self._probes:
            probe.close()
        self._probes.clear()
        if self.aggregator is not None:
            await _bounded("the aggregator", self.aggregator.stop(), 10)
        if self.registry is not None:
            await _bounded("the registry", self.registry.stop(), 10)
        self.aggregator = self.registry = None
        if self.nats is not None:
            await self.nats.stop()
            self.nats = None

    async def __aenter__(self) -> LocalFleet:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _bounded(what: str, step: Coroutine[Any, Any, None], seconds: float) -> None:
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait((task,), timeout=seconds)
    if not done:
        log.warning("%s did not stop within %.0f s; leaving it behind", what, seconds)
        task.cancel()
    elif not task.cancelled() and task.exception() is not None:
        log.warning("stopping %s failed: %s", what, task.exception())


def sim_gpus(cfg: SimConfig) -> list[Gpu]:
    """A simulated box's GPUs as its agent reports them (free VRAM follows its loaded models)."""
    return [
        Gpu(
            index=i,
            name=g.name,
            vendor=cfg.vendor,
            vram_total=int(g.vram_gb * GIB),
            vram_free=int(g.vram_gb * GIB),
        )
        for i, g in enumerate(cfg.gpus if cfg.vendor != "cpu" else [])
    ]


def default_sims(n: int, *, time_scale: float = 1.0, **overrides: Any) -> list[SimConfig]:
    """``n`` simulated boxes cycling through NVIDIA and AMD cards; ``overrides`` apply to each."""
    out = []
    for i in range(n):
        spec: dict[str, Any] = {"num_parallel": 2, "seed": i, **DEFAULT_SIMS[i % len(DEFAULT_SIMS)]}
        out.append(load_config(None, time_scale=time_scale, **(spec | overrides)))
    return out


def parse_backend(spec: str) -> Backend:
    """``http://h:11434`` or ``amd=http://h:11434`` (vendor defaults to cpu)."""
    vendor, sep, url = spec.partition("=")
    if sep and vendor in VENDORS:
        return Backend(url, vendor)
    return Backend(spec)


UP_GATEWAY_SETTINGS = ("auth", "tls_cert", "tls_key", "origins")  # `corral up` flags of the gateway's


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral up",
        description="Run the whole fleet here: embedded NATS, agents and the gateway. With no --ollama, "
        "simulated GPU servers (NVIDIA and AMD) stand in for Ollama.",
    )
    gateway, common = describe(GatewaySettings), describe(CommonSettings)
    add_argument(p, gateway["host"], default=gateway["host"].default, env=False)
    add_argument(p, gateway["port"], default=gateway["port"].default, env=False)
    for name in UP_GATEWAY_SETTINGS:
        add_argument(p, gateway[name])
    p.add_argument(
        "--ollama",
        action="append",
        default=[],
        metavar="[VENDOR=]URL",
        help="a real Ollama to put in the fleet, e.g. nvidia=http://127.0.0.1:11435 (repeat)",
    )
    p.add_argument(
        "--parallel", type=int, default=1, help="OLLAMA_NUM_PARALLEL of the --ollama servers (default 1)"
    )
    p.add_argument(
        "--sim",
        type=int,
        default=None,
        metavar="N",
        help="simulated servers of the default kind to start, besides one per --sim-config file "
        "(default 3 when neither --ollama nor --sim-config is given)",
    )
    p.add_argument(
        "--sim-config",
        action="append",
        default=[],
        metavar="FILE",
        help="a TOML file per simulated server (repeat)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="simulated time factor (0.1 = 10x faster; default 1, or a --sim-config file's time_scale)",
    )
    p.add_argument("--nats", dest="nats_url", default="", help="use this NATS instead of an embedded one")
    p.add_argument(
        "--nats-port",
        type=int,
        default=None,
        help=f"embedded NATS port (default {NATS_PORT}, or a free one while something else holds {NATS_PORT})",
    )
    p.add_argument(
        "--store-dir",
        default="",
        metavar="DIR",
        help="keep the embedded NATS's JetStream store here, so files, batches, keys, pins and aliases "
        "outlive a restart (default: a temporary one, removed at stop)",
    )
    add_argument(p, common["root"], default=common["root"].default, env=False)
    add_argument(p, common["log_level"], default=common["log_level"].default, env=False)
    return p


def sim_configs(args: argparse.Namespace) -> list[SimConfig]:
    """The simulated servers ``args`` ask for: one per ``--sim-config`` file, then ``--sim N`` of
    the defaults (3 when neither they nor ``--ollama`` are given). ``--time-scale`` overrides a
    file's ``time_scale`` only when given."""
    sims = [load_config(f, time_scale=args.time_scale) for f in args.sim_config]
    n = args.sim if args.sim is not None else (0 if args.ollama or sims else 3)
    return sims + default_sims(n, time_scale=1.0 if args.time_scale is None else args.time_scale)


NATS_PORT = 4222  # NATS's own, where `corral agent --nats nats://HOST:4222` on other hosts finds it


def embedded_nats_port(asked: int | None) -> int:
    """The embedded NATS's port: ``--nats-port`` when given, else NATS's own unless something (another
    NATS, another fleet) holds it, then a free one (0), which the banner shows."""
    if asked is not None:
        return asked
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", NATS_PORT))
        except OSError:
            return 0
    return NATS_PORT


async def _up(args: argparse.Namespace) -> int:
    sims = sim_configs(args)
    backends = [parse_backend(s) for s in args.ollama]
    for b in backends:
        b.parallel = args.parallel
    fleet = LocalFleet(
        FleetOptions(
            host=args.host,
            port=args.port,
            nats_url=args.nats_url,
            nats_port=embedded_nats_port(args.nats_port) if not args.nats_url else 0,
            root=args.root,
            sims=sims,
            backends=backends,
            log_level=args.log_level,
            gateway=args.gateway,
            registry=args.registry,
            aggregator=args.aggregator,
            store_dir=args.store_dir,
        )
    )
    # Ctrl-C is ours from here on, not Python's KeyboardInterrupt: one pressed while the fleet
    # starts (or the moment its banner is out) stops it once it has started
    signalled = asyncio.create_task(wait_for_signal(), name="signals")
    try:
        await fleet.start()
    except BaseException:
        await cancel_and_wait([signalled])
        raise
    n = len(fleet.agents)
    lines = [
        f"  {a.id:<12} {a.vendor:<7} {a.settings.ollama_url}"
        + ("   (not answering: its agent offers nothing until it does)" if a.state().ollama_down else "")
        for a in fleet.agents
    ]
    print(
        f"\nCorral is up: {n} backend{'' if n == 1 else 's'} behind one Ollama endpoint.\n"
        + "\n".join(lines)
        + f"\n\n  NATS      {fleet.nats_url}\n  Gateway   {fleet.url}\n\n"
        f"Point clients at it:  OLLAMA_HOST={fleet.url} ollama list\n"
        f"                      openai base_url={fleet.url}/v1\n"
        + _auth_hint(fleet)
        + "Ctrl-C drains and stops everything.\n",
        flush=True,
    )
    try:
        await signalled
        print("draining...", flush=True)
    finally:
        await fleet.stop()
    return 0


# what `corral up` decides itself, for every process of the fleet alike: where it listens, its root
# and log level, and the NATS connection (an embedded server, or --nats)
UP_DECIDES = frozenset(
    {"host", "port", "root", "log_level", "nats_url", "nats_creds", "js_replicas"}
    | {n for n in describe(CommonSettings) if n.startswith("nats_tls_")}
)


def _settings_given(cls: type[msgspec.Struct], flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings of one service that ``CORRAL_*`` variables or ``flags`` give (flag > variable),
    less those `corral up` decides with flags of its own: the rest keep their defaults. Agents take
    none (an agent's id, Ollama and parallel are per agent; `corral up` sets them)."""
    named = {s.name for s in describe(cls).values() if os.environ.get(s.env)}
    named |= {k for k, v in (flags or {}).items() if v is not None}
    settings = load_settings(cls, flags)
    return {name: getattr(settings, name) for name in sorted(named - UP_DECIDES)}


def _auth_hint(fleet: LocalFleet) -> str:
    if fleet.gateway is None or fleet.gateway.settings.auth != "keys":
        return ""
    return (
        "API keys are on: every request needs 'Authorization: Bearer <key>'. Make one with\n"
        f"                      corral keys create NAME --role admin --nats {fleet.nats_url}\n\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.gateway = _settings_given(
            GatewaySettings, {name: getattr(args, name) for name in UP_GATEWAY_SETTINGS}
        )
        args.registry = _settings_given(RegistrySettings)
        args.aggregator = _settings_given(AggregatorSettings)
    except SettingsError as e:
        print(f"corral up: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, service="up")
    try:
        return run(_up(args))
    except NatsPortTaken as e:  # one line, not a traceback
        print(f"corral up: the embedded NATS cannot listen: {e}; give another --nats-port", file=sys.stderr)
        return 1
    except NatsServerError as e:
        print(f"corral up: {e}", file=sys.stderr)
        return 1
