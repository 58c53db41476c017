"""Errors in log lines say what went wrong: a JetStream error's description (a `repr` gave only
``BadRequestError()``), and a bare timeout its type."""

from __future__ import annotations

from corral.runtime.nats import error_text
from nats.js.errors import BadRequestError


def test_a_jetstream_error_gives_its_description_and_a_bare_one_its_type() -> None:
    full = BadRequestError(code=400, err_code=10047, description="insufficient storage resources available")
    assert repr(full) == "BadRequestError()"  # what the log lines printed
    assert "err_code=10047" in error_text(full) and "insufficient storage resources available" in error_text(
        full
    )
    assert error_text(TimeoutError()) == "TimeoutError"
