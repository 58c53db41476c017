"""What GPUs this host has: NVIDIA through NVML, AMD through the amdgpu driver's sysfs, else RAM.

Probes, by vendor::

    nvidia   NVML (pynvml): one Gpu per device                                source "nvml"
    amd      /sys/class/drm/card<N>/device with vendor 0x1002 (amdgpu)       source "amd-sysfs"
    other    /proc/meminfo as one pseudo-GPU (CPU inference, Apple unified)   source "system-memory"

A vendor probe that finds nothing (NVML missing or failing, no amdgpu card) falls back to the
system-memory pseudo-GPU and says so in one WARNING per `GpuProbe`. A configured size
(``vram_gb_override``, in GiB) always wins: one Gpu with that total whose free memory is the total
minus what the vendor's probe reports in use (the total when the probe found nothing), source
"config".

`GpuProbe` keeps NVML initialised and its device handles cached, so `GpuProbe.refresh` is cheap
enough for every heartbeat (a few NVML calls or sysfs reads, all blocking: run it in a thread
from async code). `probe_gpus` is the one-shot form.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from corral.protocol.messages import Gpu

logger = logging.getLogger(__name__)

GIB = 1024**3
AMD_PCI_VENDOR = "0x1002"

SOURCE_NVML = "nvml"
SOURCE_AMD_SYSFS = "amd-sysfs"
SOURCE_SYSTEM_MEMORY = "system-memory"
SOURCE_CONFIG = "config"

_CARD = re.compile(r"card(\d+)")


class _NvmlMemory(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def free(self) -> int: ...


class _NvmlUtilization(Protocol):
    @property
    def gpu(self) -> int: ...


class NvmlLike(Protocol):
    """The slice of the `pynvml` module the probe uses; tests pass a fake object."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int: ...

    def nvmlDeviceGetHandleByIndex(self, index: int, /) -> object: ...

    def nvmlDeviceGetName(self, handle: object, /) -> str | bytes: ...

    def nvmlDeviceGetMemoryInfo(self, handle: object, /) -> _NvmlMemory: ...

    def nvmlDeviceGetUtilizationRates(self, handle: object, /) -> _NvmlUtilization: ...


def _nvml_shutdown(nvml: NvmlLike) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as exc:
        logger.debug("nvmlShutdown failed: %s", exc)


def _import_nvml() -> NvmlLike | None:
    try:
        import pynvml
    except ImportError:
        return None
    nvml: NvmlLike = pynvml
    return nvml


class _NvmlDevice:
    __slots__ = ("handle", "index", "name")

    def __init__(self, index: int, handle: object, name: str) -> None:
        self.index = index
        self.handle = handle
        self.name = name


class GpuProbe:
    """Reads this host's GPUs again on every `refresh`; `close` releases NVML (idempotent).

    NVML is initialised on the first refresh of an "nvidia" probe and kept until `close`; a
    failed initialisation is not retried until then, so a host without a driver stays cheap.
    """

    def __init__(
        self,
        vendor: str,
        *,
        vram_gb_override: float | None = None,
        sysfs_root: Path = Path("/sys"),
        meminfo: Path | None = None,
        nvml: NvmlLike | None = None,
    ) -> None:
        if vram_gb_override is not None and vram_gb_override <= 0:
            raise ValueError(f"vram_gb_override must be positive, got {vram_gb_override!r}")
        self.vendor = vendor
        self._override = vram_gb_override
        self._sysfs_root = sysfs_root
        self._meminfo = meminfo if meminfo is not None else sysfs_root.parent / "proc" / "meminfo"
        self._nvml = nvml
        self._nvml_devices: list[_NvmlDevice] | None = None  # None: not initialised
        self._nvml_failed = False
        self._warned: set[str] = set()

    # -- public ------------------------------------------------------------------------------
    def refresh(self) -> list[Gpu]:
        """This host's GPUs now (never empty unless even system memory cannot be read)."""
        probed = self._probe_vendor()
        if self._override is not None:
            return [self._configured(self._override, probed)]
        if probed:
            return probed
        return self._system_memory()

    def close(self) -> None:
        """Shut NVML down if this probe initialised it. Safe to call twice or before refresh."""
        devices, self._nvml_devices = self._nvml_devices, None
        self._nvml_failed = False
        if devices is not None and self._nvml is not None:
            _nvml_shutdown(self._nvml)

    def __enter__(self) -> GpuProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- vendor probes -----------------------------------------------------------------------
    def _probe_vendor(self) -> list[Gpu]:
        """The vendor's own probe; [] (after a one-time WARNING) when it found nothing."""
        if self.vendor == "nvidia":
            return self._nvidia()
        if self.vendor == "amd":
            gpus = _amd_sysfs(self._sysfs_root)
            if not gpus:
                self._fallback("amd", "no amdgpu card under %s", self._sysfs_root / "class" / "drm")
            return gpus
        if self.vendor == "cpu":
            return self._system_memory() if self._override is not None else []
        self._fallback(f"vendor-{self.vendor}", "no GPU probe for vendor %r", self.vendor)
        return []

    def _nvidia(self) -> list[Gpu]:
        devices = self._nvml_open()
        if not devices or self._nvml is None:
            return []
        nvml = self._nvml
        gpus: list[Gpu] = []
        for device in devices:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(device.handle)
            except nvml.NVMLError as exc:
                self._warn_once(
                    f"nvml-memory-{device.index}",
                    "NVML cannot read memory of GPU %d (%s): leaving it out",
                    device.index,
                    exc,
                )
                continue
            try:
                utilization: float | None = float(nvml.nvmlDeviceGetUtilizationRates(device.handle).gpu)
            except nvml.NVMLError:
                utilization = None  # e.g. NOT_SUPPORTED on MIG instances
            gpus.append(
                Gpu(
                    index=device.index,
                    name=device.name,
                    vendor="nvidia",
                    vram_total=int(memory.total),
                    vram_free=int(memory.free),
                    utilization=utilization,
                    source=SOURCE_NVML,
                )
            )
        if not gpus:
            self._fallback("nvml-empty", "NVML could read none of %d GPUs", len(devices))
        return gpus

    def _nvml_open(self) -> list[_NvmlDevice]:
        """Initialise NVML once and cache the device handles and names."""
        if self._nvml_devices is not None:
            return self._nvml_devices
        if self._nvml_failed:
            return []
        if self._nvml is None:
            self._nvml = _import_nvml()
        nvml = self._nvml
        if nvml is None:
            self._nvml_failed = True
            self._fallback("nvml", "NVML unavailable (the pynvml module is not installed)")
            return []
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self._nvml_failed = True
            self._fallback("nvml", "NVML unavailable (%s)", exc)
            return []
        devices: list[_NvmlDevice] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(_NvmlDevice(index, handle, _text(nvml.nvmlDeviceGetName(handle))))
        except nvml.NVMLError as exc:
            self._nvml_failed = True
            _nvml_shutdown(nvml)
            self._fallback("nvml", "NVML cannot list GPUs (%s)", exc)
            return []
        if not devices:
            self._nvml_failed = True
            _nvml_shutdown(nvml)
            self._fallback("nvml", "NVML reports no GPUs")
            return []
        logger.info("NVML: %d GPU(s): %s", len(devices), ", ".join(d.name for d in devices))
        self._nvml_devices = devices
        return devices

    # -- fallbacks ---------------------------------------------------------------------------
    def _system_memory(self) -> list[Gpu]:
        gpu = _system_memory(self._meminfo)
        if gpu is None:
            self._warn_once("meminfo", "cannot read system memory from %s either: no GPUs", self._meminfo)
            return []
        return [gpu]

    def _configured(self, gib: float, probed: Sequence[Gpu]) -> Gpu:
        total = int(gib * GIB)
        used = sum(g.vram_total - g.vram_free for g in probed)
        known = [g.utilization for g in probed if g.utilization is not None]
        return Gpu(
            index=0,
            name=probed[0].name if len(probed) == 1 else f"{self.vendor} ({gib:g} GiB configured)",
            vendor=self.vendor,
            vram_total=total,
            vram_free=max(0, total - used),
            utilization=sum(known) / len(known) if known else None,
            source=SOURCE_CONFIG,
        )

    def _fallback(self, key: str, why: str, *args: object) -> None:
        if self._override is not None:
            then = "using the configured %g GiB as all free"
            self._warn_once(key, f"{why}; {then}", *args, self._override)
        else:
            self._warn_once(key, f"{why}; falling back to system memory as one pseudo-GPU", *args)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(msg, *args)


def probe_gpus(
    vendor: str,
    *,
    vram_gb_override: float | None = None,
    sysfs_root: Path = Path("/sys"),
    meminfo: Path | None = None,
    nvml: NvmlLike | None = None,
) -> list[Gpu]:
    """This host's GPUs for ``vendor``, once (see the module docstring for the fallbacks).

    ``meminfo`` defaults to ``proc/meminfo`` beside ``sysfs_root`` (``/proc/meminfo``).
    """
    with GpuProbe(
        vendor, vram_gb_override=vram_gb_override, sysfs_root=sysfs_root, meminfo=meminfo, nvml=nvml
    ) as probe:
        return probe.refresh()


def detect_vendor(*, sysfs_root: Path = Path("/sys"), nvml: NvmlLike | None = None) -> str:
    """Return "nvidia" when NVML sees a GPU, else "amd" for an amdgpu card in sysfs, else "cpu"."""
    if nvml is None:
        nvml = _import_nvml()
    if nvml is not None:
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            logger.debug("detect_vendor: NVML unavailable (%s)", exc)
        else:
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as exc:
                logger.debug("detect_vendor: NVML cannot count GPUs (%s)", exc)
                count = 0
            finally:
                _nvml_shutdown(nvml)
            if count > 0:
                return "nvidia"
    if _amd_cards(sysfs_root):
        return "amd"
    return "cpu"


# -- sysfs and procfs readers (pure functions of a path) --------------------------------------
def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _amd_cards(sysfs_root: Path) -> list[Path]:
    """``class/drm/card<N>/device`` dirs of AMD cards, by card number (connectors excluded)."""
    drm = sysfs_root / "class" / "drm"
    try:
        entries = list(drm.iterdir())
    except OSError:
        return []
    cards = sorted(
        (int(m.group(1)), entry / "device")
        for entry in entries
        if (m := _CARD.fullmatch(entry.name)) is not None
    )
    return [device for _, device in cards if _read(device / "vendor") == AMD_PCI_VENDOR]


def _amd_sysfs(sysfs_root: Path) -> list[Gpu]:
    gpus: list[Gpu] = []
    for device in _amd_cards(sysfs_root):
        total = _read_int(device / "mem_info_vram_total")
        used = _read_int(device / "mem_info_vram_used")
        if total is None or used is None:
            logger.debug("%s: no amdgpu VRAM counters; skipped", device)
            continue
        busy = _read_int(device / "gpu_busy_percent")
        gpus.append(
            Gpu(
                index=len(gpus),
                name=_read(device / "product_name") or "AMD GPU",
                vendor="amd",
                vram_total=total,
                vram_free=max(0, total - used),
                utilization=float(busy) if busy is not None else None,
                source=SOURCE_AMD_SYSFS,
            )
        )
    return gpus


def _system_memory(meminfo: Path) -> Gpu | None:
    """System RAM as one pseudo-GPU, from meminfo (kB), else from sysconf (total only)."""
    fields: dict[str, int] = {}
    text = _read(meminfo)
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[key] = int(value[0]) * 1024
    total = fields.get("MemTotal")
    free = fields.get("MemAvailable", fields.get("MemFree"))
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if free is None:
        free = total
    return Gpu(
        index=0,
        name="system memory",
        vendor="cpu",
        vram_total=total,
        vram_free=min(free, total),
        utilization=None,
        source=SOURCE_SYSTEM_MEMORY,
    )
