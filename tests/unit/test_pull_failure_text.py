"""A fleet-wide pull's error: Ollama's words where every agent failed and said the same, else each
failed agent named."""

from __future__ import annotations

from corral.registry.pulls import failure_text


def test_one_agents_error_is_ollamas_own_text() -> None:
    assert failure_text({"gpu-0": "pull model manifest: file does not exist"}, 1) == (
        "pull model manifest: file does not exist"
    )


def test_the_same_error_from_every_agent_is_said_once() -> None:
    same = "pull model manifest: file does not exist"
    assert failure_text({"gpu-0": same, "gpu-1": same}, 2) == same


def test_an_agent_that_failed_where_others_pulled_is_named() -> None:
    assert failure_text({"gpu-1": "pull model manifest: file does not exist"}, 3) == (
        "gpu-1: pull model manifest: file does not exist"
    )


def test_different_errors_name_their_agents() -> None:
    errors = {"gpu-0": "pull model manifest: file does not exist", "gpu-1": "pull ended without success"}
    assert failure_text(errors, 2) == (
        "gpu-0: pull model manifest: file does not exist; gpu-1: pull ended without success"
    )
