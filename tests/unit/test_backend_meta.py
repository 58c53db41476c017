"""The agent's reading of its Ollama: a model's shape from /api/show once (one that failed is asked
again only later), and an Ollama that went away and came back."""

from __future__ import annotations

import logging

import pytest
from corral.agent.backend import META_RETRY_S, Backend
from corral.protocol.messages import ModelMeta, PsModel, TagModel

MODEL = TagModel(name="m:latest", model="m:latest", modified_at="", size=1, digest="d1")


class Ollama:
    """What `Backend.read` asks of Ollama; /api/show fails until ``shows_ok``."""

    base_url = "http://ollama"

    def __init__(self) -> None:
        self.shows = 0
        self.shows_ok = False

    async def version(self) -> str:
        return "0.12.3"

    async def tags(self) -> list[TagModel]:
        return [MODEL]

    async def ps(self) -> list[PsModel]:
        return []

    async def model_meta(self, name: str) -> ModelMeta:
        self.shows += 1
        if not self.shows_ok:
            raise OSError("connection refused")
        return ModelMeta(layers=28, kv_heads=8, head_dim=128, trained_ctx=131072)


async def test_a_failed_show_is_asked_again_after_a_while_not_on_every_refresh() -> None:
    now = [0.0]
    ollama = Ollama()
    backend = Backend(ollama, vendor="cpu", context_length=0, gpus=(), probe=None, clock=lambda: now[0])  # type: ignore[arg-type]
    await backend.read()
    await backend.read()  # the next refresh, seconds later
    assert ollama.shows == 1 and backend.model_meta == {}
    ollama.shows_ok = True
    now[0] += META_RETRY_S
    await backend.read()
    assert ollama.shows == 2 and backend.model_meta["m:latest"].trained_ctx == 131072
    await backend.read()
    assert ollama.shows == 2  # known now: never asked again


async def test_an_ollama_that_went_away_reads_as_empty_and_its_return_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While Ollama cannot be read the agent advertises nothing; when it answers again the log
    says so once, so an operator reading the warnings knows the outage ended."""
    ollama = Ollama()
    ollama.shows_ok = True
    backend = Backend(ollama, vendor="cpu", context_length=0, gpus=(), probe=None, clock=lambda: 0.0)  # type: ignore[arg-type]
    tags = ollama.tags

    async def refused() -> list[TagModel]:
        raise OSError("connection refused")

    ollama.tags = refused  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="corral.agent.backend"):
        await backend.read()
        assert backend.down and backend.models == ()
        ollama.tags = tags  # type: ignore[method-assign]
        await backend.read()
        await backend.read()
    assert not backend.down and backend.models == (MODEL,)
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert [r.getMessage() for r in back] == ["ollama at http://ollama answers again"]
