"""Docker discovery's pure part: a container's inspect document (shaped as the Docker Engine API
returns it) → the Ollama an agent serves, or nothing."""

from __future__ import annotations

import copy

import pytest
from corral.agent.docker import backend_of, engine_host, is_ollama, ollama_port

from tests.integration.fake_docker import container, summary


def test_a_published_nvidia_ollama_is_reached_on_its_host_port_with_its_slots() -> None:
    doc = container("ollama-0", host_port=11500, env=("OLLAMA_NUM_PARALLEL=4", "OLLAMA_CONTEXT_LENGTH=8192"),
                    nvidia=True, device_ids=["1"])  # fmt: skip
    b = backend_of(doc)
    assert b is not None
    assert (b.name, b.url, b.vendor, b.parallel, b.context_length) == (
        "ollama-0", "http://127.0.0.1:11500", "nvidia", 4, 8192
    )  # fmt: skip
    assert b.gpu_ids == (1,) and b.container_id == doc["Id"]


def test_a_remote_engine_publishes_on_its_own_host() -> None:
    b = backend_of(container("o", host_port=11500), engine=engine_host("tcp://gpu-box-3:2376"))
    assert b is not None and b.url == "http://gpu-box-3:11500"
    assert engine_host("unix:///var/run/docker.sock") == "127.0.0.1"
    assert engine_host("ssh://me@gpu-box-4") == "gpu-box-4"


def test_a_port_bound_to_one_address_is_reached_there() -> None:
    doc = container("o", host_port=11500)
    doc["NetworkSettings"]["Ports"]["11434/tcp"] = [{"HostIp": "10.0.0.7", "HostPort": "11500"}]
    b = backend_of(doc)
    assert b is not None and b.url == "http://10.0.0.7:11500"


def test_unpublished_it_is_reached_at_its_address_or_on_the_named_network() -> None:
    doc = container("o", networks={"corral": "10.9.0.5", "bridge": "172.17.0.3"})
    b = backend_of(doc)
    assert b is not None and b.url == "http://172.17.0.3:11434"  # first network by name
    b = backend_of(doc, network="corral")
    assert b is not None and b.url == "http://10.9.0.5:11434"
    assert backend_of(doc, network="elsewhere") is None
    published = backend_of(container("p", host_port=11500, networks={"corral": "10.9.0.6"}), network="corral")
    assert published is not None and published.url == "http://10.9.0.6:11434"  # the network wins


def test_ollama_host_in_the_container_moves_its_port() -> None:
    doc = container("o", networks={"bridge": "172.17.0.4"})
    doc["Config"]["Env"] = ["OLLAMA_HOST=0.0.0.0:8080"]
    assert ollama_port({"OLLAMA_HOST": "http://[::]:9000"}) == 9000
    assert ollama_port({"OLLAMA_HOST": "0.0.0.0"}) == 11434
    b = backend_of(doc)
    assert b is not None and b.url == "http://172.17.0.4:8080"


def test_amd_by_dev_kfd_or_a_rocm_image_cpu_otherwise() -> None:
    amd = backend_of(container("a", image="ollama/ollama:rocm", kfd=True))
    rocm_only = backend_of(container("r", image="ollama/ollama:0.5.7-rocm"))
    kfd_only = backend_of(container("k", kfd=True))
    cpu = backend_of(container("c"))
    assert [b.vendor if b else None for b in (amd, rocm_only, kfd_only, cpu)] == ["amd", "amd", "amd", "cpu"]
    runtime = container("n")
    runtime["HostConfig"]["Runtime"] = "nvidia"
    assert (backend_of(runtime) or pytest.fail()).vendor == "nvidia"


def test_slots_default_to_the_agents_own_and_garbage_is_ignored() -> None:
    assert (backend_of(container("o"), default_parallel=3) or pytest.fail()).parallel == 3
    odd = container("o", env=("OLLAMA_NUM_PARALLEL=lots",))
    assert (backend_of(odd, default_parallel=2) or pytest.fail()).parallel == 2


def test_other_images_stopped_or_paused_containers_are_not_backends() -> None:
    assert backend_of(container("web", image="nginx:latest")) is None
    stopped = container("o")
    stopped["State"] |= {"Status": "exited", "Running": False}
    paused = container("p")
    paused["State"] |= {"Status": "paused", "Paused": True}
    assert backend_of(stopped) is None and backend_of(paused) is None


@pytest.mark.parametrize(
    ("image", "labels", "expected"),
    [
        ("ollama/ollama", {}, True),
        ("ollama/ollama:0.5.7", {}, True),
        ("docker.io/ollama/ollama:rocm", {}, True),
        ("registry.local:5000/ollama/ollama@sha256:abcd", {}, True),
        ("my/llm-server:1", {"corral.ollama": "true"}, True),
        ("ollama/ollama", {"corral.ollama": "false"}, False),
        ("ollama/ollama-webui", {}, False),
        ("nginx", {}, False),
    ],
)
def test_which_containers_are_ollamas(image: str, labels: dict[str, str], expected: bool) -> None:
    assert is_ollama(image, labels) is expected


def test_the_summary_the_fake_lists_is_the_documented_shape() -> None:
    doc = container("o", host_port=11500)
    s = summary(copy.deepcopy(doc))
    assert s["Names"] == ["/o"] and s["State"] == "running"
    assert {"PrivatePort": 11434, "Type": "tcp", "IP": "0.0.0.0", "PublicPort": 11500} in s["Ports"]
