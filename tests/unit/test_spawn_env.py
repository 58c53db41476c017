"""What each GPU's `ollama serve` is started with."""

from __future__ import annotations

import socket

import pytest
from corral.agent.agentset import agent_id
from corral.agent.spawn import ollama_env, ports


def test_an_nvidia_gpu_sees_only_itself_in_nvml_order() -> None:
    env = ollama_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2"}, vendor="nvidia", gpu=2, port=11437,
                     parallel=4, max_loaded_models=2, models_dir="/srv/models", context_length=8192)  # fmt: skip
    assert env == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "2",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "OLLAMA_HOST": "127.0.0.1:11437",
        "OLLAMA_NUM_PARALLEL": "4",
        "OLLAMA_MAX_LOADED_MODELS": "2",
        "OLLAMA_MODELS": "/srv/models",
        "OLLAMA_CONTEXT_LENGTH": "8192",
    }


def test_an_amd_gpu_is_chosen_by_rocr_and_is_hips_only_device() -> None:
    env = ollama_env({}, vendor="amd", gpu=1, port=11436, parallel=1)
    assert (env["ROCR_VISIBLE_DEVICES"], env["HIP_VISIBLE_DEVICES"]) == ("1", "0")
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert "OLLAMA_MAX_LOADED_MODELS" not in env and "OLLAMA_MODELS" not in env  # Ollama's defaults


def test_ports_count_up_or_are_free_ones() -> None:
    assert ports(11435, 3) == [11435, 11436, 11437]
    with pytest.raises(ValueError, match="65535"):
        ports(65535, 2)
    free = ports(0, 3)
    assert len(set(free)) == 3
    for port in free:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed


def test_agent_ids_are_stable_and_token_safe() -> None:
    assert agent_id("GPU.box", "gpu0") == "gpu-box-gpu0"
    assert agent_id("box", "ollama_1") == agent_id("box", "ollama_1")
