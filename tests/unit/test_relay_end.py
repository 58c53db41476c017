"""Which batch of a reply holds its last line (`corral.gateway.relay._ends_answer`): the substring
tests in front of the expression change nothing it decides."""

from __future__ import annotations

from corral.gateway.relay import _DONE, _SSE_LAST, _ends_answer
from hypothesis import example, given
from hypothesis import strategies as st

_PIECES = [
    b"data: [DONE]", b"event: response.completed", b"event: message_stop", b'"done":true', b'"done":false',
    b"\n", b"\n\n", b"data: ", b"event: ", b"[DONE]", b"x", b" ", b'{"response":"', b'"}',
]  # fmt: skip


@given(st.lists(st.sampled_from(_PIECES), max_size=30))
@example([b'{"response":"', b"data: [DONE]", b'"}'])  # the words inside a text, not at a line's start
@example([b"x", b"\n", b"event: message_stop"])
def test_the_last_batch_is_told_as_by_the_expression_alone(pieces: list[bytes]) -> None:
    batch = b"".join(pieces)
    assert _ends_answer(batch) == (_DONE in batch or _SSE_LAST.search(batch) is not None)
