"""When a KV watch's snapshot is complete (`Catchup`): the server's count, not the client's; and a
watch hands out a backlog one loop turn at a time."""

from __future__ import annotations

import asyncio
import json

from corral.runtime.kvwatch import Catchup, Entry, KvWatch, _subjects, operation


def test_the_snapshot_ends_after_as_many_messages_as_the_server_counted() -> None:
    c = Catchup()
    assert not c.message(pending=2)  # messages may come before the server's count is in
    assert not c.sized(3)
    assert not c.message(pending=1)
    assert c.message(pending=0)
    assert c.done and not c.message(pending=0)  # once only


def test_a_count_reached_before_it_was_known_ends_the_snapshot_when_it_is() -> None:
    """The server had sent every message before it answered how many there were (the case
    nats-py's watch ends too early on: it counts only the messages its callback has handled)."""
    c = Catchup()
    for pending in (2, 1, 0):
        assert not c.message(pending)
    assert c.sized(3)


def test_an_empty_watch_ends_at_once() -> None:
    assert Catchup().sized(0)


def test_nothing_pending_is_not_the_end_while_the_count_is_short() -> None:
    """Under concurrent writes a message can report 0 pending and more follow behind it."""
    c = Catchup()
    c.sized(4)
    assert not c.message(pending=0)
    assert not c.message(pending=1)
    assert not c.message(pending=0)
    assert c.message(pending=3)  # the fourth: the count, whatever it reports


def test_settling_ends_a_snapshot_whose_counted_messages_vanished() -> None:
    """A purge or an expiry can remove messages after the server counted them."""
    c = Catchup()
    c.sized(5)
    assert not c.settled()  # nothing came yet: no message has said nothing more is pending
    c.message(pending=3)
    assert not c.settled()  # more to come by its own account
    c.message(pending=0)
    assert c.settled() and c.done
    assert not c.settled()


def test_operation_reads_kv_headers_and_server_markers() -> None:
    assert operation(None) is None
    assert operation({}) is None
    assert operation({"KV-Operation": "DEL"}) == "DEL"
    assert operation({"KV-Operation": "PURGE"}) == "PURGE"
    assert operation({"Nats-Marker-Reason": "MaxAge"}) == "PURGE"
    assert operation({"Nats-Marker-Reason": "Purge"}) == "PURGE"
    assert operation({"Nats-Marker-Reason": "Remove"}) == "DEL"
    assert operation({"Nats-Marker-Reason": "Later"}) == "?"


async def test_a_backlog_is_handed_out_one_loop_turn_per_entry() -> None:
    """A reader working through queued entries (a fleet of agents' heartbeats under load) gives
    the loop back after each one, so the gateway's requests are not kept waiting behind them."""

    class Bucket:
        _pre = "$KV.b."

    w = KvWatch(Bucket(), ">", ignore_deletes=False, inactive_s=5.0)  # type: ignore[arg-type]
    w._catchup.sized(0)
    for i in range(10):
        w._queue.put_nowait(
            Entry(bucket="b", key=f"k{i}", value=b"v", revision=i + 1, delta=0, created=None, operation=None)
        )
    turns = 0

    async def spin() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    spinner = asyncio.create_task(spin())
    try:
        got = [await w.updates(1.0) for _ in range(10)]
    finally:
        spinner.cancel()
    assert [e.key for e in got if e is not None] == [f"k{i}" for i in range(10)]
    assert turns >= 10


class _PagedServer:
    """A stream's INFO answers as nats-server gives them for a subjects filter: at most ``limit``
    subjects a page, from the asked ``offset``, with the ``total``."""

    _prefix = "$JS.API"
    _timeout = 5.0

    def __init__(self, subjects: list[str], limit: int) -> None:
        self.subjects, self.limit, self.asked = subjects, limit, []

    async def _api_request(self, subject: str, req: bytes, timeout: float) -> dict[str, object]:
        ask = json.loads(req)
        self.asked.append((subject, ask["offset"]))
        page = self.subjects[ask["offset"] : ask["offset"] + self.limit]
        return {"state": {"subjects": dict.fromkeys(page, 1)}, "total": len(self.subjects)}


async def test_every_page_of_a_streams_subjects_is_read() -> None:
    """The server lists at most 100,000 subjects an answer: a listing past that read only the first
    page and stopped early, losing the newest records (the batches a gateway must finish)."""
    server = _PagedServer([f"s.{i:03d}" for i in range(250)], limit=100)
    got = await _subjects(server, "S", "s.>")  # type: ignore[arg-type]
    assert got == set(server.subjects)
    assert server.asked == [
        ("$JS.API.STREAM.INFO.S", 0),
        ("$JS.API.STREAM.INFO.S", 100),
        ("$JS.API.STREAM.INFO.S", 200),
    ]
    assert await _subjects(_PagedServer([], limit=100), "S", "s.>") == set()  # type: ignore[arg-type]
