"""The NVML probe against the real driver; skipped where NVML cannot initialise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from corral.agent.gpu import GpuProbe, detect_vendor, probe_gpus

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nvml_device_count() -> Iterator[int]:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"NVML cannot initialise here: {exc}")
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
    if count < 1:
        pytest.skip("NVML initialised but reports no GPUs")
    yield count


def test_probe_reads_every_gpu(nvml_device_count: int) -> None:
    gpus = probe_gpus("nvidia")
    assert len(gpus) == nvml_device_count >= 1
    for index, gpu in enumerate(gpus):
        assert gpu.index == index
        assert gpu.vendor == "nvidia"
        assert gpu.source == "nvml"
        assert gpu.name
        assert gpu.vram_total > 0
        assert 0 <= gpu.vram_free <= gpu.vram_total
        assert gpu.utilization is None or 0 <= gpu.utilization <= 100


def test_refresh_keeps_nvml_open_until_close(nvml_device_count: int) -> None:
    with GpuProbe("nvidia") as probe:
        first = probe.refresh()
        second = probe.refresh()
    assert [g.name for g in first] == [g.name for g in second]
    assert [g.vram_total for g in first] == [g.vram_total for g in second]


def test_detect_vendor_is_nvidia(nvml_device_count: int) -> None:
    assert detect_vendor() == "nvidia"
