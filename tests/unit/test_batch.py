"""The Batch API's pure parts: input validation, output assembly, and a batch's life as a state
machine (every path of a hypothesis-driven run ends in a status OpenAI shows, with its timestamps)."""

from __future__ import annotations

import json

import msgspec
import pytest
from corral.gateway.batch import model
from corral.gateway.batch.lines import answered, assemble, common_model, parse_input, unanswered
from corral.gateway.batch.model import Refused
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

CHAT = "/v1/chat/completions"


def line(custom_id: str = "a", url: str = CHAT, **body: object) -> bytes:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", **body}}
    ).encode()


def test_valid_lines_become_bodies_with_streaming_off() -> None:
    data = (
        b"\n".join([line("a", stream=True, stream_options={"include_usage": True}), b"", line("b")]) + b"\n"
    )
    lines, errors = parse_input(data, CHAT, max_lines=10)
    assert errors == []
    assert [c for c, _ in lines] == ["a", "b"]
    assert json.loads(lines[0][1]) == {"model": "m", "stream": False}


def test_each_bad_line_is_named_by_its_number() -> None:
    data = b"\n".join(
        [
            line("a"),
            b"[1, 2]",
            b'{"method": "POST", "url": "/v1/chat/completions", "body": {}}',
            line("a"),
            json.dumps({"custom_id": "c", "method": "POST", "url": CHAT, "body": "x"}).encode(),
            line("d", url="/v1/completions"),
            b'{"custom_id": "e", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # past the depth
        ]
    )
    _, errors = parse_input(data, CHAT, max_lines=10)
    assert [(e.line, e.code, e.param) for e in errors] == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "missing_required_parameter", "body"),
        (6, "mismatched_endpoint", "url"),
        (7, "invalid_json_line", None),
    ]


def test_an_empty_file_and_too_many_lines_fail() -> None:
    assert [e.code for e in parse_input(b"\n \n", CHAT, max_lines=10)[1]] == ["empty_file"]
    data = b"\n".join(line(str(i)) for i in range(3))
    assert parse_input(data, CHAT, max_lines=2)[1][0].code == "too_many_requests"


def test_output_and_error_files_keep_input_order_and_openais_shapes() -> None:
    results = [
        answered("a", 200, b'{"object": "chat.completion"}', "r1"),
        answered("b", 404, b'{"error": {"message": "no"}}', "r2"),
        unanswered("c", "batch_cancelled", "not run"),
        answered("d", 200, b"not json", "r4"),
    ]
    out, err, counts, _ = assemble("batch_0123456789ab", results)
    o = [json.loads(x) for x in out.splitlines()]
    e = [json.loads(x) for x in err.splitlines()]
    assert [x["custom_id"] for x in o] == ["a", "d"] and [x["custom_id"] for x in e] == ["b", "c"]
    assert o[0] == {
        "id": o[0]["id"],
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "r1", "body": {"object": "chat.completion"}},
        "error": None,
    }
    assert o[1]["response"]["body"] == "not json"
    assert e[0]["response"]["status_code"] == 404 and e[0]["error"] is None
    assert e[1] == {
        "id": e[1]["id"],
        "custom_id": "c",
        "response": None,
        "error": {"code": "batch_cancelled", "message": "not run"},
    }
    assert len({x["id"] for x in o + e}) == 4
    assert (counts.total, counts.completed, counts.failed) == (4, 2, 2)


def test_usage_sums_every_answer_that_reports_one() -> None:
    chat = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    results = [
        answered("a", 200, json.dumps({"usage": chat}).encode(), "r1"),
        answered("b", 200, json.dumps({"usage": {"prompt_tokens": 7, "total_tokens": 7}}).encode(), "r2"),
        answered(
            "c",
            200,
            json.dumps(
                {
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": 4,
                        "prompt_tokens_details": {"cached_tokens": 2},
                        "completion_tokens_details": {"reasoning_tokens": 1},
                    }
                }
            ).encode(),
            "r3",
        ),
        answered("d", 400, b'{"error": {"message": "no"}}', "r4"),
        answered("e", 200, b"not json", "r5"),
        answered("f", 200, b'{"usage": {"prompt_tokens": "many"}}', "r6"),
        unanswered("g", "batch_cancelled", "not run"),
    ]
    usage = assemble("batch_0123456789ab", results)[3]
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (20, 9, 29)
    assert usage.input_tokens_details.cached_tokens == 2
    assert usage.output_tokens_details.reasoning_tokens == 1


def test_a_batch_names_its_model_only_when_every_line_names_the_same() -> None:
    def parsed(*models: object) -> list[tuple[str, bytes]]:
        data = b"\n".join(line(f"l{i}", model=m) for i, m in enumerate(models))
        lines, errors = parse_input(data, CHAT, max_lines=10)
        assert errors == []
        return lines

    assert common_model(parsed("llama3.2", "llama3.2")) == "llama3.2"
    assert common_model(parsed("llama3.2", "LLAMA3.2:latest")) == "llama3.2"  # one model, two spellings
    assert common_model(parsed("llama3.2", None)) is None
    assert common_model(parsed("llama3.2", "qwen3")) is None
    assert common_model(parsed("llama3.2", 7)) is None
    assert common_model([]) is None


def test_a_finished_batch_shows_its_model_and_usage() -> None:
    r = model.queued(_record(), 2, 101, "llama3.2")
    assert r.batch.model == "llama3.2" and r.batch.usage is None
    usage = model.BatchUsage(input_tokens=3, output_tokens=4, total_tokens=7)
    done = model.finished(model.finalize(r, 102), model.RequestCounts(total=2), "file-o", None, 103, usage)
    shown = json.loads(msgspec.json.encode(done.batch))
    assert shown["model"] == "llama3.2"
    assert shown["usage"] == {
        "input_tokens": 3,
        "output_tokens": 4,
        "total_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def test_ids_windows_and_output_file_ids() -> None:
    b, f = model.new_id("batch"), model.new_id("file")
    assert model.is_id(b) and model.is_id(f) and not model.is_id("../etc") and not model.is_id("batch_x")
    assert model.output_file_id(b, "output") != model.output_file_id(b, "error")
    assert model.is_id(model.output_file_id(b, "output"))
    assert model.window_seconds("24h") == 86400 and model.window_seconds("90m") == 5400
    for bad in ("24", "0h", "1d", "h"):
        with pytest.raises(ValueError):
            model.window_seconds(bad)


def test_expires_after_is_bounded_as_openai_bounds_it() -> None:
    assert model.expiry_seconds("created_at", 3600) == 3600
    assert model.expiry_seconds("created_at", "2592000") == 2_592_000  # a multipart form's string
    for anchor, seconds in [
        ("created_at", 3599),
        ("created_at", 2_592_001),
        ("last_active_at", 3600),
        ("created_at", "an hour"),
        ("created_at", True),
        ("created_at", None),
        (None, 3600),
    ]:
        with pytest.raises(ValueError, match="expires_after"):
            model.expiry_seconds(anchor, seconds)
    meta = model.FileMeta(filename="f", purpose="batch", created_at=100, expires_at=200)
    assert not meta.expired(199) and meta.expired(200)
    assert not model.FileMeta(filename="f", purpose="batch", created_at=100).expired(10**10)


def _record() -> model.BatchRecord:
    return model.new_batch(
        "batch_000000000000aa", endpoint=CHAT, input_file_id="file-x", window="24h", now=100
    )


class BatchLife(RuleBasedStateMachine):
    """Any sequence of steps a fleet of runners may take, in any order, against one record."""

    def __init__(self) -> None:
        super().__init__()
        self.r = _record()
        self.t = 100

    def _try(self, step: object) -> None:
        self.t += 1
        try:
            self.r = step(self.r)  # type: ignore[operator]
        except Refused:
            pass

    @rule(total=st.integers(1, 5))
    def queue(self, total: int) -> None:
        self._try(lambda r: model.queued(r, total, self.t))

    @rule()
    def fail(self) -> None:
        self._try(lambda r: model.failed(r, [model.BatchError(code="x", message="y")], self.t))

    @rule()
    def cancel(self) -> None:
        self._try(lambda r: model.cancel(r, self.t))

    @rule()
    def expire(self) -> None:
        self._try(model.expire)

    @rule()
    def finalize(self) -> None:
        self._try(lambda r: model.finalize(r, self.t))

    @rule()
    def finish(self) -> None:
        self._try(lambda r: model.finished(r, model.RequestCounts(total=r.total), "file-o", None, self.t))

    @invariant()
    def shown_as_openai_does(self) -> None:
        b = self.r.batch
        stamps = {
            "in_progress": b.in_progress_at, "finalizing": b.finalizing_at, "completed": b.completed_at,
            "failed": b.failed_at, "expired": b.expired_at, "cancelling": b.cancelling_at,
            "cancelled": b.cancelled_at,
        }  # fmt: skip
        if b.status != "validating":
            assert stamps[b.status] is not None, b.status
        if b.status in ("completed", "expired", "cancelled"):
            assert b.output_file_id == "file-o" and self.r.total >= 0
        if b.status == "completed":
            assert b.in_progress_at and b.finalizing_at and not b.cancelling_at and not self.r.ending
        if b.status == "expired":
            assert self.r.ending == "expire"
        if b.status == "cancelled":
            assert b.cancelling_at and self.r.closing
        if b.status == "failed":
            assert self.r.total < 0 and b.errors is not None
        assert msgspec.json.decode(msgspec.json.encode(self.r), type=model.BatchRecord) == self.r


TestBatchLife = BatchLife.TestCase


def test_a_finished_batch_cannot_be_cancelled_but_a_cancelled_one_may_be_again() -> None:
    r = model.finalize(model.queued(_record(), 2, 101), 102)
    with pytest.raises(Refused):
        model.cancel(r, 103)
    c = model.cancel(model.queued(_record(), 2, 101), 102)
    assert model.cancel(c, 104) == c


def test_a_user_sees_only_its_own() -> None:
    r = msgspec.structs.replace(_record(), owner="alice")
    assert model.visible_to(r, None) and model.visible_to(r, "alice") and not model.visible_to(r, "bob")
