"""Errors in the shape of the API a request speaks: Ollama's, OpenAI's on /v1, Anthropic's on
/v1/messages (https://docs.ollama.com/api/anthropic-compatibility)."""

from __future__ import annotations

import msgspec
import pytest
from corral.gateway.errors import dialect, error_body


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/api/chat", "ollama"),
        ("/api/tags", "ollama"),
        ("/v1/chat/completions", "openai"),
        ("/v1/responses", "openai"),
        ("/v1/models/x", "openai"),
        ("/v1/messages", "anthropic"),
        ("/v1/messages/count_tokens", "openai"),  # no such route in Ollama: its 404 is OpenAI's
    ],
)
def test_a_path_speaks_one_api(path: str, api: str) -> None:
    assert dialect(path) == api


def test_each_api_words_an_error_its_own_way() -> None:
    assert msgspec.json.decode(error_body("ollama", 404, "model 'x' not found")) == {
        "error": "model 'x' not found"
    }
    assert msgspec.json.decode(error_body("openai", 429, "slow down")) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
    }
    body = msgspec.json.decode(error_body("anthropic", 503, "busy"))
    assert body["type"] == "error" and body["error"] == {"type": "overloaded_error", "message": "busy"}
    assert body["request_id"].startswith("req_") and len(body["request_id"]) == 4 + 24
    assert msgspec.json.decode(error_body("anthropic", 404, "m"))["error"]["type"] == "not_found_error"
    assert msgspec.json.decode(error_body("anthropic", 500, "m"))["error"]["type"] == "api_error"
