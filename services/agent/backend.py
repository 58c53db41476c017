"""The agent's reading of its Ollama: what is on disk, what is loaded, its version and its GPUs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple, TypeVar

import msgspec
from corral.agent.ollama import OLLAMA_ERRORS, OllamaClient
from corral.agent.runners import until_expiry
from corral.agent.stalls import Stalls, Watched
from corral.protocol.messages import Gpu, ModelMeta, PsModel, TagModel
from corral.protocol.names import key_of

log = logging.getLogger(__name__)

_GIB = 1 << 30
J = TypeVar("J", bound=Watched)
META_RETRY_S = 60.0  # a model whose /api/show failed is asked again after this, not every refresh


class Reading(NamedTuple):
    loaded: list[PsModel]  # /api/ps
    trained: dict[str, int]  # loaded model name → its trained context (0 = unknown)
    changed: bool  # what is on disk, loaded, the version or the GPUs changed since the last reading


class Backend:
    """Reads one Ollama (and this host's GPUs when a probe is given); holds the last reading.

    Seventeen attributes: what it reads with (the client, the clock, the probe, the vendor and
    context setting, the reading lock), the reading itself (models, loaded, version, GPUs, model
    shapes, down, hung, started), the shapes' cache and retries, and its streams' silences."""

    def __init__(
        self,
        ollama: OllamaClient,
        *,
        vendor: str,
        context_length: int,
        gpus: tuple[Gpu, ...],
        probe: Callable[[], list[Gpu]] | None,
        stall_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ollama = ollama
        self._clock = clock
        self.vendor = vendor
        self.context_length = context_length  # the backend's OLLAMA_CONTEXT_LENGTH (0 = unknown)
        self.gpus = gpus
        self._probe = probe
        self.models: tuple[TagModel, ...] = ()
        self.loaded: tuple[PsModel, ...] = ()
        self.version = ""
        self.hung = False  # its last reading got no answer within the control timeout
        self.down = False  # its last reading failed (it reads as empty until one succeeds)
        self.started_at = time.time()
        self._meta_by_digest: dict[str, ModelMeta] = {}
        self._meta_retry_at: dict[str, float] = {}  # digest whose /api/show failed → when to ask again
        self.model_meta: dict[str, ModelMeta] = {}  # model key (on disk) → its shape
        self._reading = asyncio.Lock()
        self._stalls = Stalls(stall_s)  # streamed requests it sends nothing for (`stuck`)

    def next_read_s(self, longest: float) -> float:
        """Seconds until Ollama is to be read again: ``longest``, or sooner when a runner's
        keep_alive runs out before (`corral.agent.runners.until_expiry`)."""
        return until_expiry(self.loaded, time.time(), longest)

    def stuck(
        self, jobs: Sequence[J], heard: Mapping[str, bytes], ready: Collection[str]
    ) -> list[tuple[J, str]]:
        """Running requests this Ollama would leave waiting for good, and why: those that heard
        nothing from it (``heard``: their last bytes before the reading just made) while that
        reading got no answer (`hung`), and streamed ones it has sent nothing for ``stall_s`` (of
        a model ``ready``, loaded: `corral.agent.stalls`)."""
        url = self.ollama.base_url
        hung = [j for j in jobs if self.hung and heard.get(j.rid) is j.last_bytes]
        said = {j.rid for j in hung}
        stalled = [j for j in self._stalls.look(jobs, self._clock(), ready) if j.rid not in said]
        silent = f"ollama at {url} sent nothing for {self._stalls.limit_s:.0f} s"
        return [(j, f"ollama at {url} is not answering") for j in hung] + [(j, silent) for j in stalled]

    async def read(self) -> Reading:
        """Re-read Ollama; an unreachable or odd backend reads as empty (advertise nothing until it
        is back). One reading at a time (the periodic one, one before an answer ends): a reading
        begun earlier never lands after, and over, a later one."""
        async with self._reading:
            return await self._read()

    async def _read(self) -> Reading:
        before = (self.models, self.loaded, self.version, self.gpus)
        try:
            if not self.version:
                self.version = await self.ollama.version()
            models, loaded = await self.ollama.tags(), await self.ollama.ps()
        except OLLAMA_ERRORS as e:
            log.warning("cannot read ollama at %s: %r", self.ollama.base_url, e)
            self.version = ""
            models, loaded = [], []
            # no answer within the control timeout: the server hangs (Ollama answers these at once,
            # loading or generating), so what waits on it would wait for good
            self.hung = isinstance(e, TimeoutError)
            self.down = True
        else:
            if self.down:
                log.info("ollama at %s answers again", self.ollama.base_url)
            self.hung = self.down = False
        if self._probe is not None:
            try:
                self.gpus = tuple(await asyncio.to_thread(self._probe))
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("GPU probe failed, keeping the last reading: %s", e)
        self.gpus = _with_ollama_usage(self.gpus, loaded)
        for name, digest in [(m.name, m.digest) for m in models] + [(m.name, m.digest) for m in loaded]:
            await self._read_meta(name, digest)
        self.model_meta = _meta_by_key(models, self._meta_by_digest)
        trained = {m.name: self._trained_context(m.digest) for m in loaded}
        self.models, self.loaded = tuple(models), tuple(loaded)
        return Reading(loaded, trained, (self.models, self.loaded, self.version, self.gpus) != before)

    async def _read_meta(self, name: str, digest: str) -> None:
        """Asks Ollama for a model's shape once per digest (its trained context caps every
        runner's num_ctx; the rest sizes the KV cache a load allocates)."""
        if digest in self._meta_by_digest or self._clock() < self._meta_retry_at.get(digest, 0.0):
            return
        try:
            self._meta_by_digest[digest] = await self.ollama.model_meta(name)
        except OLLAMA_ERRORS as e:
            log.warning("cannot read %s's metadata (asking again in %.0f s): %s", name, META_RETRY_S, e)
            self._meta_retry_at[digest] = self._clock() + META_RETRY_S
        else:
            self._meta_retry_at.pop(digest, None)

    def _trained_context(self, digest: str) -> int:
        meta = self._meta_by_digest.get(digest)
        return meta.trained_ctx if meta is not None else 0

    def default_num_ctx(self) -> int:
        """The backend's num_ctx for requests that give none: OLLAMA_CONTEXT_LENGTH when configured,
        else Ollama's VRAM tier — ≥ 47 GiB of VRAM → 262144, ≥ 23 GiB → 32768, else 4096. (Ollama
        before 0.15.5 used a flat 4096: configure ``context_length`` for it.)"""
        if self.context_length > 0:
            return self.context_length
        total = 0 if self.vendor == "cpu" else sum(g.vram_total for g in self.gpus)
        return 262144 if total >= 47 * _GIB else 32768 if total >= 23 * _GIB else 4096


def _with_ollama_usage(gpus: tuple[Gpu, ...], loaded: list[PsModel]) -> tuple[Gpu, ...]:
    """GPUs known only from configuration have no live reading: their free VRAM is what Ollama's
    loaded models leave (their ``size_vram``, spread evenly). Probed GPUs report their own."""
    config = [g for g in gpus if g.source == "config"]
    if not config:
        return gpus
    used = sum(m.size_vram for m in loaded) // len(config)
    return tuple(
        msgspec.structs.replace(g, vram_free=max(g.vram_total - used, 0)) if g.source == "config" else g
        for g in gpus
    )


def _meta_by_key(models: list[TagModel], by_digest: dict[str, ModelMeta]) -> dict[str, ModelMeta]:
    out: dict[str, ModelMeta] = {}
    for m in models:
        key, meta = key_of(m.name), by_digest.get(m.digest)
        if key is not None and meta is not None and meta != ModelMeta():
            out[key] = meta
    return out
