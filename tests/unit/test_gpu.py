"""GPU probes against a fake NVML, a fake amdgpu sysfs tree and a fake /proc/meminfo."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from corral.agent.gpu import GIB, GpuProbe, detect_vendor, probe_gpus
from corral.protocol.messages import Gpu

MIB = 1024**2


class FakeNvmlError(Exception):
    pass


@dataclass
class Memory:
    total: int
    free: int
    used: int = 0


@dataclass
class Utilization:
    gpu: int
    memory: int = 0


@dataclass
class FakeDevice:
    name: str | bytes
    total: int
    free: int
    util: int | None = 50  # None: NOT_SUPPORTED
    memory_error: bool = False


@dataclass
class FakeNvml:
    """Just enough of pynvml; counts calls so tests can see what is cached."""

    devices: list[FakeDevice] = field(default_factory=list)
    init_error: str | None = None
    count_error: bool = False
    calls: dict[str, int] = field(default_factory=dict)
    initialised: int = 0

    NVMLError = FakeNvmlError

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def nvmlInit(self) -> None:
        self._call("init")
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._call("shutdown")
        if self.initialised == 0:
            raise FakeNvmlError("Uninitialized")
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._call("count")
        if self.count_error:
            raise FakeNvmlError("Unknown Error")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._call("handle")
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str | bytes:
        self._call("name")
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> Memory:
        self._call("memory")
        if handle.memory_error:
            raise FakeNvmlError("GPU is lost")
        return Memory(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> Utilization:
        self._call("util")
        if handle.util is None:
            raise FakeNvmlError("Not Supported")
        return Utilization(gpu=handle.util)


def make_amd_card(
    sysfs: Path,
    card: str,
    *,
    vendor: str = "0x1002",
    total: int | None = 16 * GIB,
    used: int | None = 4 * GIB,
    busy: str | None = "37",
    product: str | None = None,
) -> None:
    device = sysfs / "class" / "drm" / card / "device"
    device.mkdir(parents=True)
    (device / "vendor").write_text(f"{vendor}\n")
    for filename, value in (
        ("mem_info_vram_total", total),
        ("mem_info_vram_used", used),
        ("gpu_busy_percent", busy),
        ("product_name", product),
    ):
        if value is not None:
            (device / filename).write_text(f"{value}\n")


def write_meminfo(
    root: Path, *, total_kb: int = 32 * 1024 * 1024, available_kb: int = 20 * 1024 * 1024
) -> Path:
    path = root / "proc" / "meminfo"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"MemTotal:       {total_kb} kB\nMemFree:         1234 kB\nMemAvailable:   {available_kb} kB\n"
        "Buffers:          100 kB\nHugePages_Total:       0\n"
    )
    return path


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """An empty /sys with /proc/meminfo beside it (32 GiB total, 20 GiB available)."""
    root = tmp_path / "sys"
    (root / "class" / "drm").mkdir(parents=True)
    write_meminfo(tmp_path)
    return root


SYSTEM_MEMORY = Gpu(
    index=0,
    name="system memory",
    vendor="cpu",
    vram_total=32 * GIB,
    vram_free=20 * GIB,
    utilization=None,
    source="system-memory",
)


# -- NVIDIA ----------------------------------------------------------------------------------
def test_nvml_reports_each_device(sysfs: Path) -> None:
    nvml = FakeNvml(
        devices=[
            FakeDevice(name="NVIDIA H100 80GB HBM3", total=80 * GIB, free=70 * GIB, util=12),
            FakeDevice(name=b"NVIDIA RTX 4090", total=24 * GIB, free=24 * GIB - 300 * MIB, util=None),
        ]
    )
    assert probe_gpus("nvidia", sysfs_root=sysfs, nvml=nvml) == [
        Gpu(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            vendor="nvidia",
            vram_total=80 * GIB,
            vram_free=70 * GIB,
            utilization=12.0,
            source="nvml",
        ),
        Gpu(
            index=1,
            name="NVIDIA RTX 4090",
            vendor="nvidia",
            vram_total=24 * GIB,
            vram_free=24 * GIB - 300 * MIB,
            utilization=None,
            source="nvml",
        ),
    ]
    assert nvml.initialised == 0, "probe_gpus shuts NVML down"


def test_probe_refresh_reuses_init_and_handles(sysfs: Path) -> None:
    device = FakeDevice(name="GPU", total=8 * GIB, free=8 * GIB, util=0)
    nvml = FakeNvml(devices=[device])
    probe = GpuProbe("nvidia", sysfs_root=sysfs, nvml=nvml)
    first = probe.refresh()
    device.free, device.util = 2 * GIB, 99
    second = probe.refresh()
    probe.close()
    probe.close()

    assert (first[0].vram_free, first[0].utilization) == (8 * GIB, 0.0)
    assert (second[0].vram_free, second[0].utilization) == (2 * GIB, 99.0)
    assert nvml.calls == {
        "init": 1,
        "count": 1,
        "handle": 1,
        "name": 1,
        "memory": 2,
        "util": 2,
        "shutdown": 1,
    }
    assert nvml.initialised == 0


def test_close_before_refresh_is_a_no_op(sysfs: Path) -> None:
    nvml = FakeNvml(devices=[FakeDevice(name="GPU", total=GIB, free=GIB)])
    with GpuProbe("nvidia", sysfs_root=sysfs, nvml=nvml):
        pass
    assert nvml.calls == {}


@pytest.mark.parametrize(
    ("nvml", "why"),
    [
        (FakeNvml(init_error="NVML Shared Library Not Found"), "NVML Shared Library Not Found"),
        (FakeNvml(devices=[]), "NVML reports no GPUs"),
        (FakeNvml(devices=[FakeDevice(name="x", total=1, free=1)], count_error=True), "Unknown Error"),
        (
            FakeNvml(devices=[FakeDevice(name="x", total=1, free=1, memory_error=True)]),
            "NVML could read none of 1 GPUs",
        ),
    ],
    ids=["init-error", "no-devices", "count-error", "memory-error"],
)
def test_nvml_failure_falls_back_to_system_memory_and_warns_once(
    sysfs: Path, nvml: FakeNvml, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.agent.gpu")
    with GpuProbe("nvidia", sysfs_root=sysfs, nvml=nvml) as probe:
        assert probe.refresh() == [SYSTEM_MEMORY]
        warned = len(caplog.records)
        assert probe.refresh() == [SYSTEM_MEMORY]
    assert len(caplog.records) == warned, "a refresh repeats no warning"
    [fallback] = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert why in fallback
    assert fallback.endswith("falling back to system memory as one pseudo-GPU")
    assert nvml.calls["init"] == 1, "a failed NVML is not retried on every refresh"
    assert nvml.initialised == 0, "NVML is shut down after a failure past init"


def test_one_lost_gpu_is_left_out(sysfs: Path) -> None:
    nvml = FakeNvml(
        devices=[
            FakeDevice(name="lost", total=GIB, free=GIB, memory_error=True),
            FakeDevice(name="fine", total=2 * GIB, free=GIB),
        ]
    )
    gpus = probe_gpus("nvidia", sysfs_root=sysfs, nvml=nvml)
    assert [(g.index, g.name) for g in gpus] == [(1, "fine")]


# -- AMD -------------------------------------------------------------------------------------
def test_amd_sysfs_cards(sysfs: Path) -> None:
    make_amd_card(sysfs, "card10", total=8 * GIB, used=GIB, busy=None)
    make_amd_card(sysfs, "card1", product="AMD Instinct MI300X", total=192 * GIB, used=2 * GIB, busy="5")
    make_amd_card(sysfs, "card0", vendor="0x8086")  # an Intel iGPU beside them
    make_amd_card(sysfs, "card1-DP-1")  # a connector, not a card
    make_amd_card(sysfs, "card2", total=None)  # radeon driver: no VRAM counters
    assert probe_gpus("amd", sysfs_root=sysfs) == [
        Gpu(
            index=0,
            name="AMD Instinct MI300X",
            vendor="amd",
            vram_total=192 * GIB,
            vram_free=190 * GIB,
            utilization=5.0,
            source="amd-sysfs",
        ),
        Gpu(
            index=1,
            name="AMD GPU",
            vendor="amd",
            vram_total=8 * GIB,
            vram_free=7 * GIB,
            utilization=None,
            source="amd-sysfs",
        ),
    ]


def test_amd_without_cards_falls_back(sysfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="corral.agent.gpu")
    assert probe_gpus("amd", sysfs_root=sysfs) == [SYSTEM_MEMORY]
    assert "no amdgpu card" in caplog.text
    assert "falling back to system memory" in caplog.text


# -- CPU / system memory ---------------------------------------------------------------------
def test_cpu_is_system_memory_without_a_warning(sysfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="corral.agent.gpu")
    assert probe_gpus("cpu", sysfs_root=sysfs, nvml=FakeNvml()) == [SYSTEM_MEMORY]
    assert caplog.records == []


def test_meminfo_path_is_injectable(tmp_path: Path) -> None:
    meminfo = write_meminfo(tmp_path / "elsewhere", total_kb=1024, available_kb=2048)
    [gpu] = probe_gpus("cpu", sysfs_root=tmp_path / "sys", meminfo=meminfo)
    assert (gpu.vram_total, gpu.vram_free) == (1024 * 1024, 1024 * 1024), "free never exceeds total"


def test_unreadable_meminfo_uses_sysconf(tmp_path: Path) -> None:
    [gpu] = probe_gpus("cpu", sysfs_root=tmp_path / "sys")
    assert gpu.source == "system-memory"
    assert 0 < gpu.vram_free <= gpu.vram_total


# -- configured size -------------------------------------------------------------------------
def test_override_subtracts_what_the_probe_sees_in_use(sysfs: Path) -> None:
    nvml = FakeNvml(devices=[FakeDevice(name="NVIDIA L4", total=23 * GIB, free=20 * GIB, util=40)])
    assert probe_gpus("nvidia", vram_gb_override=16, sysfs_root=sysfs, nvml=nvml) == [
        Gpu(
            index=0,
            name="NVIDIA L4",
            vendor="nvidia",
            vram_total=16 * GIB,
            vram_free=13 * GIB,
            utilization=40.0,
            source="config",
        )
    ]


def test_override_sums_usage_over_gpus(sysfs: Path) -> None:
    make_amd_card(sysfs, "card0", total=16 * GIB, used=4 * GIB, busy="10")
    make_amd_card(sysfs, "card1", total=16 * GIB, used=2 * GIB, busy="30")
    [gpu] = probe_gpus("amd", vram_gb_override=24.5, sysfs_root=sysfs)
    assert gpu.source == "config"
    assert gpu.vram_total == int(24.5 * GIB)
    assert gpu.vram_free == int(24.5 * GIB) - 6 * GIB
    assert gpu.utilization == 20.0
    assert gpu.name == "amd (24.5 GiB configured)"


def test_override_without_a_working_probe_is_all_free(sysfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="corral.agent.gpu")
    nvml = FakeNvml(init_error="Driver Not Loaded")
    [gpu] = probe_gpus("nvidia", vram_gb_override=8, sysfs_root=sysfs, nvml=nvml)
    assert (gpu.vram_total, gpu.vram_free, gpu.vendor, gpu.source) == (8 * GIB, 8 * GIB, "nvidia", "config")
    assert "Driver Not Loaded" in caplog.text
    assert "configured 8 GiB" in caplog.text


def test_override_never_goes_negative(sysfs: Path) -> None:
    [gpu] = probe_gpus("cpu", vram_gb_override=4, sysfs_root=sysfs)  # 12 GiB of RAM in use
    assert (gpu.vram_total, gpu.vram_free) == (4 * GIB, 0)


def test_override_must_be_positive(sysfs: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        GpuProbe("cpu", vram_gb_override=0, sysfs_root=sysfs)


# -- vendor detection ------------------------------------------------------------------------
def test_detect_nvidia(sysfs: Path) -> None:
    nvml = FakeNvml(devices=[FakeDevice(name="GPU", total=GIB, free=GIB)])
    make_amd_card(sysfs, "card0")
    assert detect_vendor(sysfs_root=sysfs, nvml=nvml) == "nvidia"
    assert nvml.initialised == 0


def test_detect_amd_when_nvml_fails(sysfs: Path) -> None:
    make_amd_card(sysfs, "card0")
    assert detect_vendor(sysfs_root=sysfs, nvml=FakeNvml(init_error="not found")) == "amd"


def test_detect_cpu(sysfs: Path) -> None:
    make_amd_card(sysfs, "card0", vendor="0x8086")
    assert detect_vendor(sysfs_root=sysfs, nvml=FakeNvml(devices=[])) == "cpu"
    assert detect_vendor(sysfs_root=sysfs / "missing", nvml=FakeNvml(count_error=True)) == "cpu"
