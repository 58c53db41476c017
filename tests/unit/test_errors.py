"""The error tree: HTTP statuses, stable codes, retryable flags, and rebuilding from headers."""

from __future__ import annotations

import pytest
from corral.protocol import headers as H
from corral.protocol.errors import (
    BUSY_MESSAGE,
    AgentUnavailable,
    BackendError,
    BadEnvelope,
    BadRequest,
    Cancelled,
    CorralError,
    Forbidden,
    InternalError,
    InvalidModelName,
    ModelNotFound,
    NoCapacity,
    ReplyOverflow,
    ServiceStopping,
    end_error,
    from_code,
)


def _tree(cls: type[CorralError]) -> list[type[CorralError]]:
    out: list[type[CorralError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_tree(sub)]
    return out


ALL = _tree(CorralError)

EXPECTED = {
    # class: (code, status, retryable)
    BadRequest: ("bad_request", 400, False),
    InvalidModelName: ("invalid_model_name", 400, False),
    BadEnvelope: ("bad_request", 400, False),
    Forbidden: ("forbidden", 403, False),
    ModelNotFound: ("model_not_found", 404, False),
    NoCapacity: ("no_capacity", 503, False),
    AgentUnavailable: ("agent_unavailable", 502, True),
    ServiceStopping: ("agent_unavailable", 502, True),  # travels as its base, marked (`end_error`)
    BackendError: ("backend_error", 502, True),
    Cancelled: ("cancelled", 499, False),
    ReplyOverflow: ("reply_overflow", 503, False),
    InternalError: ("internal", 500, False),
}


def test_the_tree_is_exactly_the_documented_one() -> None:
    assert set(ALL) == set(EXPECTED)
    assert issubclass(InvalidModelName, BadRequest)
    for cls in ALL:
        assert issubclass(cls, Exception)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_code_status_and_retryable(cls: type[CorralError]) -> None:
    assert (cls.code, cls.status, cls.retryable) == EXPECTED[cls]


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in ALL if "code" in vars(cls)]  # BadEnvelope, ServiceStopping: as their bases
    assert len(codes) == len(set(codes))
    assert type(from_code("bad_request", "x")) is BadRequest


def test_only_transport_failures_are_retryable() -> None:
    assert {cls for cls in ALL if cls.retryable} == {AgentUnavailable, ServiceStopping, BackendError}


def test_message_is_kept() -> None:
    err = ModelNotFound("model 'llama3' not found")
    assert err.message == str(err) == "model 'llama3' not found"


def test_invalid_model_name_uses_ollamas_text_and_keeps_the_name() -> None:
    err = InvalidModelName("foo:")
    assert err.message == str(err) == "invalid model name"
    assert err.name == "foo:"
    assert err.status == 400


def test_busy_message_is_ollamas_text_with_two_spaces() -> None:
    assert BUSY_MESSAGE == "server busy, please try again.  maximum pending requests exceeded"
    assert "again.  maximum" in BUSY_MESSAGE
    assert NoCapacity().message == str(NoCapacity()) == BUSY_MESSAGE
    assert NoCapacity("queue timeout").message == "queue timeout"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_from_code_round_trip(cls: type[CorralError]) -> None:
    err = from_code(cls.code, "some message")
    assert type(err) is (cls if "code" in vars(cls) else cls.__mro__[1])
    assert isinstance(err, CorralError)
    assert err.message == str(err) == "some message"
    assert (err.code, err.status, err.retryable) == (cls.code, cls.status, cls.retryable)


def test_from_code_busy() -> None:
    err = from_code("no_capacity", BUSY_MESSAGE)
    assert isinstance(err, NoCapacity)
    assert str(err) == BUSY_MESSAGE


@pytest.mark.parametrize("code", ["", "nope", "INTERNAL", "Bad_Request"])
def test_unknown_code_becomes_internal_error(code: str) -> None:
    err = from_code(code, "boom")
    assert type(err) is InternalError
    assert err.message == "boom"
    assert err.status == 500
    assert not err.retryable


def test_rebuilt_errors_can_be_raised_and_caught_by_class() -> None:
    with pytest.raises(BackendError, match="connection refused"):
        raise from_code("backend_error", "connection refused")


def test_a_stopping_service_travels_as_the_retryable_error_older_senders_know() -> None:
    stopped = end_error(
        {H.ERROR_CODE: "agent_unavailable", H.ERROR: "the registry is stopping", H.STOPPING: "1"}
    )
    assert isinstance(stopped, ServiceStopping) and stopped.message == "the registry is stopping"
    assert type(end_error({H.ERROR_CODE: "agent_unavailable", H.ERROR: "gone"})) is AgentUnavailable
    assert type(end_error({H.ERROR_CODE: "bad_request", H.ERROR: "no", H.STOPPING: "1"})) is BadRequest
    assert type(from_code("agent_unavailable", "x")) is AgentUnavailable  # the code alone: the base
