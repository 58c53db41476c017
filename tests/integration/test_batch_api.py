"""The OpenAI Batch and Files APIs on a real fleet (nats-server, simulators, agents, the gateway on a
real socket), driven by the ``openai`` SDK exactly as against OpenAI: upload, create, retrieve, list,
cancel, read the output and error files; and with API keys on, each user key sees only its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats.errors
import openai
import pytest
from corral.gateway.batch import model
from corral.gateway.keys import create_key, open_key_buckets
from corral.protocol.subjects import Subjects
from corral.runtime.kvwatch import latest_per_subject
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, LocalFleet, default_sims
from nats.js.errors import APIError

from tests.integration import waits
from tests.integration.batch_helpers import (
    EMBED,
    LLAMA,
    exactly_once,
    jsonl,
    keyed_fleet,
    outcome,
    request,
    submit,
    wait_until,
)
from tests.integration.cli_helpers import corral
from tests.integration.fleet_helpers import preload, seen

pytestmark = pytest.mark.integration


@pytest.fixture
async def fleet(nats_server: NatsServer, root: str) -> AsyncIterator[LocalFleet]:
    options = FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(2, time_scale=0),
        agent={"heartbeat_s": 0.5},
    )
    async with LocalFleet(options) as f:
        await preload(f, LLAMA)
        yield f


@pytest.fixture
async def client(fleet: LocalFleet) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def js(fleet: LocalFleet):  # type: ignore[no-untyped-def]
    assert fleet.gateway is not None and fleet.gateway.nc is not None
    return fleet.gateway.nc.jetstream()


@pytest.mark.parametrize(
    ("endpoint", "model", "kind"),
    [
        ("/v1/chat/completions", LLAMA, "chat.completion"),
        ("/v1/completions", LLAMA, "text_completion"),
        ("/v1/embeddings", EMBED, "list"),
    ],
)
async def test_a_batch_runs_every_line_through_the_fleet(
    fleet: LocalFleet, client: openai.AsyncOpenAI, root: str, endpoint: str, model: str, kind: str
) -> None:
    lines = [request(i, endpoint, model) for i in range(6)]
    b = await submit(client, jsonl(lines), endpoint)
    assert b.object == "batch" and b.endpoint == endpoint and b.status in ("validating", "in_progress")
    assert b.completion_window == "24h" and b.expires_at == b.created_at + 86400
    done = await wait_until(client, js(fleet), root, b.id)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    out, err = await outcome(client, done)
    assert err == []
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(6)]  # input order
    for x in out:
        assert x["error"] is None and x["id"].startswith("batch_req_")
        assert x["response"]["status_code"] == 200 and x["response"]["request_id"]
        assert x["response"]["body"]["object"] == kind
    # the batch names its model and sums its lines' usage as OpenAI's batch object does
    assert done.model == model and done.usage is not None
    bodies = [x["response"]["body"]["usage"] for x in out]
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in bodies) > 0
    assert done.usage.output_tokens == sum(u.get("completion_tokens", 0) for u in bodies)
    assert done.usage.total_tokens == sum(u["total_tokens"] for u in bodies)
    assert (done.usage.output_tokens > 0) == (kind != "list")
    assert done.output_file_id is not None
    f = await client.files.retrieve(done.output_file_id)
    assert f.purpose == "batch_output" and f.bytes > 0  # type: ignore[comparison-overlap]
    # a finished batch keeps nothing but its record and files: its results were dropped
    sub = Subjects(root)
    info = await js(fleet).stream_info(
        sub.kv_stream(sub.batch_results_bucket),
        subjects_filter=sub.kv_key(sub.batch_results_bucket, f"{b.id}.>"),
    )
    assert not info.state.subjects


async def test_a_models_refusal_is_that_lines_answer_in_the_error_file(
    fleet: LocalFleet, client: openai.AsyncOpenAI, root: str
) -> None:
    lines = [request(0), request(1, model="no-such-model:latest"), request(2)]
    done = await wait_until(client, js(fleet), root, (await submit(client, jsonl(lines))).id)
    assert done.status == "completed" and done.model is None  # its lines name two models
    assert done.request_counts is not None and (
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (2, 1)
    out, err = await outcome(client, done)
    assert [x["custom_id"] for x in out] == ["req-0", "req-2"]
    assert len(err) == 1 and err[0]["custom_id"] == "req-1" and err[0]["error"] is None
    assert err[0]["response"]["status_code"] == 404
    assert "no-such-model" in err[0]["response"]["body"]["error"]["message"]


async def test_an_invalid_input_file_fails_the_batch_at_validation(
    fleet: LocalFleet, client: openai.AsyncOpenAI, root: str
) -> None:
    good = request(0)
    lines = [
        jsonl([good]),
        b"{not json\n",
        jsonl([{k: v for k, v in request(2).items() if k != "custom_id"}]),
        jsonl([good]),  # its custom_id again
        jsonl([request(4) | {"url": "/v1/images"}]),
        jsonl([request(5) | {"url": "/v1/embeddings"}]),  # another endpoint than the batch's
        jsonl([request(6) | {"method": "GET"}]),
    ]
    b = await submit(client, b"".join(lines))
    done = await wait_until(client, js(fleet), root, b.id)
    assert done.status == "failed" and done.failed_at and done.output_file_id is None
    assert done.errors is not None and done.errors.data is not None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "missing_required_parameter"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "mismatched_endpoint"),
        (7, "invalid_method"),
    }


async def test_a_cancelled_batch_answers_every_line_once(nats_server: NatsServer, root: str) -> None:
    # simulated generation at real speed: most lines are still waiting when the cancel comes
    options = FleetOptions(port=0, nats_url=nats_server.url, root=root, sims=default_sims(2, time_scale=1.0))
    lines = [request(i) for i in range(60)]
    for line in lines:
        line["body"]["max_tokens"] = 40
    async with (
        LocalFleet(options) as fleet,
        openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        b = await submit(c, jsonl(lines))
        cancelling = await c.batches.cancel(b.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        done = await wait_until(c, js(fleet), root, b.id)
        assert done.status == "cancelled" and done.cancelled_at
        out, err = await outcome(c, done)
        exactly_once(out, err, [x["custom_id"] for x in lines])
        cancelled = [x for x in err if x["error"] and x["error"]["code"] == "batch_cancelled"]
        assert cancelled and all(x["response"] is None for x in cancelled)
        assert done.request_counts is not None and done.request_counts.total == 60
        assert done.request_counts.failed == len(err) and done.request_counts.completed == len(out)
        assert (await c.batches.cancel(b.id)).status == "cancelled"  # again: nothing changes
        finished = await wait_until(c, js(fleet), root, (await submit(c, jsonl(lines[:1]))).id)
        assert finished.status == "completed"
        with pytest.raises(openai.ConflictError):  # a completed batch cannot be cancelled
            await c.batches.cancel(finished.id)


async def test_batches_and_files_are_listed_newest_first_a_page_at_a_time(
    fleet: LocalFleet, client: openai.AsyncOpenAI, root: str
) -> None:
    made = [await submit(client, jsonl([request(i)])) for i in range(3)]
    page = await client.batches.list(limit=2)
    assert [b.id for b in page.data] == [made[2].id, made[1].id] and page.has_more
    every = [b.id async for b in client.batches.list(limit=2)]  # the SDK follows `after`
    assert every == [m.id for m in reversed(made)]
    files = [f.id async for f in client.files.list(purpose="batch")]
    assert files == sorted((m.input_file_id for m in made), reverse=True)
    for m in made:
        await wait_until(client, js(fleet), root, m.id)


async def test_files_deleted_while_listed_page_by_page_are_all_deleted(client: openai.AsyncOpenAI) -> None:
    """Deleting each file as the SDK pages through them: the next page starts after the deleted
    last one (``after`` is a position). It used to be empty, so only the first page was deleted."""
    made = [await client.files.create(file=(f"{i}.txt", b"x"), purpose="user_data") for i in range(7)]
    async for f in client.files.list(purpose="user_data", limit=3):
        await client.files.delete(f.id)
    assert [f.id async for f in client.files.list(purpose="user_data")] == []
    oldest = [f.id async for f in client.files.list(order="asc", limit=2, after=made[2].id)]  # type: ignore[call-arg]
    assert oldest == []  # all gone; and in ascending order "after" counts upwards
    again = [await client.files.create(file=(f"{i}.txt", b"x"), purpose="user_data") for i in range(3)]
    page = await client.files.list(purpose="user_data", order="asc", after=again[0].id)  # type: ignore[call-arg]
    assert [f.id for f in page.data] == [again[1].id, again[2].id]


async def test_files_expire_as_asked_and_are_then_gone(
    fleet: LocalFleet, client: openai.AsyncOpenAI, root: str
) -> None:
    f = await client.files.create(
        file=("in.jsonl", jsonl([request(0)])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert f.expires_at == f.created_at + 3600
    assert (await client.files.retrieve(f.id)).expires_at == f.expires_at
    for bad in (59, 2_592_001):
        with pytest.raises(openai.BadRequestError, match="expires_after.seconds"):
            await client.files.create(
                file=("x.jsonl", b"{}"),
                purpose="batch",
                expires_after={"anchor": "created_at", "seconds": bad},
            )
    b = await client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    done = await wait_until(client, js(fleet), root, b.id)
    assert done.output_file_id is not None
    output = await client.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200
    # a file past its expires_at is hidden at once, and the sweep deletes it
    assert fleet.gateway is not None
    lifecycle = fleet.gateway.batches.lifecycle
    old = model.FileMeta(filename="old.jsonl", purpose="batch", created_at=1, expires_at=int(time.time()) - 1)
    await lifecycle.store.put_file(model.new_id("file"), b"{}\n", old)
    gone = model.new_id("file")
    await lifecycle.store.put_file(gone, b"{}\n", old)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(gone)
    with pytest.raises(openai.NotFoundError):
        await client.files.content(gone)
    assert gone not in [x.id async for x in client.files.list()]
    assert len(await lifecycle.store.files(expired=True)) == 2
    await lifecycle.delete_expired_files()
    assert await lifecycle.store.files(expired=True) == []
    assert f.id in [x.id async for x in client.files.list()]  # one that has not expired stays


async def test_with_keys_a_user_sees_only_its_own_batches_and_files(
    nats_server: NatsServer, root: str
) -> None:
    async with LocalFleet(keyed_fleet(nats_server, root)) as fleet:
        await preload(fleet, LLAMA)
        gw = fleet.gateway
        assert gw is not None and gw.access is not None
        buckets = await open_key_buckets(js(fleet), Subjects(root))
        keys = {
            name: await create_key(buckets.keys, name, role=role)  # type: ignore[arg-type]
            for name, role in (("alice", "user"), ("bob", "user"), ("root", "admin"))
        }
        for key in keys.values():
            await seen(gw, key)

        def as_key(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0)

        async with (
            as_key(keys["alice"]) as alice,
            as_key(keys["bob"]) as bob,
            as_key(keys["root"]) as admin,
            as_key("corral-nope") as stranger,
        ):
            await _only_their_own(fleet, root, alice, bob, admin, stranger)


async def _only_their_own(
    fleet: LocalFleet,
    root: str,
    alice: openai.AsyncOpenAI,
    bob: openai.AsyncOpenAI,
    admin: openai.AsyncOpenAI,
    stranger: openai.AsyncOpenAI,
) -> None:
    gw = fleet.gateway
    assert gw is not None
    mine = await submit(alice, jsonl([request(i) for i in range(3)]))
    done = await wait_until(alice, js(fleet), root, mine.id)
    assert done.status == "completed"
    theirs = await wait_until(bob, js(fleet), root, (await submit(bob, jsonl([request(0)]))).id)
    assert [b.id async for b in alice.batches.list()] == [mine.id]
    assert [b.id async for b in bob.batches.list()] == [theirs.id]
    assert {b.id async for b in admin.batches.list()} == {mine.id, theirs.id}
    with pytest.raises(openai.NotFoundError):
        await bob.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(done.output_file_id or "")
    with pytest.raises(openai.NotFoundError):  # nor can another's input file start a batch
        await bob.batches.create(
            input_file_id=mine.input_file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert {f.id async for f in alice.files.list()} == {mine.input_file_id, done.output_file_id}
    with pytest.raises(openai.AuthenticationError):
        await stranger.batches.list()

    # a batch's lines run as the key that made it, looked up when each runs: once that key is
    # revoked, its remaining lines fail
    ghost = model.new_batch(
        model.new_id("batch"),
        endpoint="/v1/chat/completions",
        input_file_id=mine.input_file_id,
        window="24h",
        now=int(time.time()),
        owner="carol-revoked",
    )
    await gw.batches.lifecycle.store.create_batch(ghost)
    await gw.batches.lifecycle.validate(ghost.batch.id)
    failed = await wait_until(admin, js(fleet), root, ghost.batch.id)
    out, err = await outcome(admin, failed)
    assert out == [] and {x["error"]["code"] for x in err} == {"invalid_api_key"} and len(err) == 3


async def corral_batch(fleet: LocalFleet, *args: str) -> tuple[int, str, str]:
    return await corral("batch", *args, "--url", fleet.url)


async def test_the_cli_submits_bare_bodies_waits_and_writes_the_results(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    bodies = [{"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3} for i in range(3)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(b) for b in bodies) + "\n\n" + json.dumps(request(9)) + "\n")
    code, out, err = await corral_batch(fleet, "submit", str(source), "--model", LLAMA, "--wait")
    assert code == 0, err
    batch_id = out.strip()
    assert "completed" in err and "4/4" in err  # the progress lines, one per change (not a terminal)
    code, out, _ = await corral_batch(fleet, "status", batch_id)
    assert code == 0 and "completed" in out and "4/4 done, 0 failed" in out
    assert f", {LLAMA}, " in out and " tokens in, " in out
    target = tmp_path / "out.jsonl"
    code, _, err = await corral_batch(fleet, "results", batch_id, "-o", str(target))
    assert code == 0, err
    got = [json.loads(x) for x in target.read_text().splitlines()]
    assert [x["custom_id"] for x in got] == ["line-1", "line-2", "line-3", "req-9"]
    assert all(x["response"]["status_code"] == 200 for x in got)
    code, out, _ = await corral_batch(fleet, "list")
    assert code == 0 and batch_id in out
    code, _, err = await corral_batch(fleet, "cancel", batch_id)
    assert code == 1 and "409" in err and "completed" in err
    # a window the gateway would refuse is refused before the file goes up (it would stay there)
    files = {f.id for f in (await _files(fleet))}
    code, out, err = await corral_batch(fleet, "submit", str(source), "--completion-window", "2d")
    assert code == 2 and not out and "invalid completion_window '2d'" in err, err
    assert {f.id for f in (await _files(fleet))} == files


async def _files(fleet: LocalFleet) -> list[Any]:
    async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x") as c:
        return [f async for f in c.files.list()]


async def test_the_cli_sends_a_batch_line_without_a_body_as_it_is_and_the_batch_fails_validation(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """A line with batch keys is a batch line, not a bare body to wrap: one without a body, or with
    a wrong method, fails the batch's validation naming it, as in OpenAI's Batch API."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(request(1)) + "\n" + json.dumps({"custom_id": "a", "method": "GET"}) + "\n")
    code, out, err = await corral_batch(fleet, "submit", str(source), "--wait")
    assert code == 1 and out.strip().startswith("batch_"), err
    assert "line 2: invalid_method: The method must be 'POST'." in err


async def test_a_line_or_result_too_big_for_a_nats_message_runs_and_is_kept(root: str) -> None:
    """A line over NATS's max_payload (a long prompt, an image) and a result over it (an embedding of
    many inputs) run as they would sent alone: each waits in the object store, not in one message.
    The line used to fail validation for good (the batch stuck in "validating"), the result to run
    again and again; and nothing of them stays once the batch is done."""
    limit = SMALL_PAYLOAD
    async with small_payload_fleet(root) as (fleet, c):
        long = request(0, max_tokens=2)
        long["body"]["messages"][0]["content"] = "word " * (limit // 4)  # 1.25 x the limit
        b = await submit(c, jsonl([long, request(1)]))
        done = await wait_until(c, js(fleet), root, b.id)
        assert done.status == "completed" and done.request_counts is not None, done.errors
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 0)
        out, err = await outcome(c, done)
        assert not err and sorted(x["custom_id"] for x in out) == ["req-0", "req-1"]
        assert all(x["response"]["status_code"] == 200 for x in out)

        many = request(0, "/v1/embeddings", EMBED)
        many["body"]["input"] = [f"text {i}" for i in range(100)]  # ~8 KB of JSON per vector
        b = await submit(c, jsonl([many, request(1, "/v1/embeddings", EMBED)]), "/v1/embeddings")
        done = await wait_until(c, js(fleet), root, b.id)
        assert done.status == "completed", done.errors
        out, err = await outcome(c, done)
        (big,) = [x for x in out if x["custom_id"] == "req-0"]
        assert len(big["response"]["body"]["data"]) == 100 and len(json.dumps(big)) > limit

        # the batch's own objects go just after it ends, records and all (a deleted object's record
        # would stay in the store for good): woken by the store's changes, at least every 0.5 s
        await waits.until(
            lambda: no_spills(fleet, root), store_changed(fleet, root), timeout=30, what="spills gone"
        )


SMALL_PAYLOAD = 256 * 1024  # a NATS server's max_payload small enough for test lines to pass it


@contextlib.asynccontextmanager
async def small_payload_fleet(root: str) -> AsyncIterator[tuple[LocalFleet, openai.AsyncOpenAI]]:
    """One simulated server behind a gateway, on a NATS server taking `SMALL_PAYLOAD` at most, and
    an OpenAI client of its gateway."""
    async with NatsServer(max_payload=SMALL_PAYLOAD) as server:
        options = FleetOptions(port=0, nats_url=server.url, root=root, sims=default_sims(1, time_scale=0))
        async with (
            LocalFleet(options) as fleet,
            openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as c,
        ):
            yield fleet, c


async def object_names(fleet: LocalFleet, root: str) -> set[str]:
    """The name of every object record in the files store, deleted ones' included."""
    store = Subjects(root).files_store
    msgs = await latest_per_subject(js(fleet), f"OBJ_{store}", f"$O.{store}.M.>", timeout=5.0)
    return {json.loads(m.data)["name"] for m in msgs}


async def no_spills(fleet: LocalFleet, root: str) -> bool:
    return not [n for n in await object_names(fleet, root) if ".spill." in n]


def store_changed(fleet: LocalFleet, root: str) -> waits.Wake:
    async def wake(left: float) -> None:
        store = await js(fleet).object_store(Subjects(root).files_store)
        watcher = await store.watch(updates_only=True)
        try:
            with contextlib.suppress(nats.errors.TimeoutError):
                await watcher.updates(timeout=min(left, 0.5))
        finally:
            await watcher.stop()

    return wake


async def test_lines_the_files_store_cannot_keep_fail_the_batch_and_leave_nothing(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line too big for a message that the files store refuses (full): the batch fails validation
    with a line saying so, where it stayed "validating" and was validated again every few seconds;
    and what the batch kept of its own before that is deleted by the sweep once it has ended."""
    limit = SMALL_PAYLOAD
    async with small_payload_fleet(root) as (fleet, c):
        lines = [request(i, max_tokens=2) for i in range(3)]
        for line in lines:
            line["body"]["messages"][0]["content"] = "word " * (limit // 4)
        f = await c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        store = fleet.gateway.batches.lifecycle.store  # type: ignore[union-attr]
        real, asked, kept, full = store._spill, [], [], asyncio.Event()

        async def full_after_one(name: str, data: bytes) -> str:
            asked.append(name)
            if len(asked) > 1:  # the store is full once the first is in
                await full.wait()
                raise APIError(code=503, err_code=10047, description="insufficient resources")
            kept.append(await real(name, data))
            full.set()
            return kept[-1]

        monkeypatch.setattr(store, "_spill", full_after_one)
        b = await c.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await wait_until(c, js(fleet), root, b.id)
        assert done.status == "failed" and done.errors is not None and done.errors.data
        (error,) = done.errors.data
        assert error.code == "too_large" and "files store refused to keep it" in (error.message or "")
        assert kept and not await no_spills(fleet, root)  # the one kept is still there
        await fleet.gateway.batches.lifecycle.delete_expired_files()  # type: ignore[union-attr]  # the sweep's step
        assert await no_spills(fleet, root)


async def test_a_validation_nats_fails_leaves_one_batch_for_the_sweep(
    fleet: LocalFleet, client: openai.AsyncOpenAI, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS failing while a new batch's lines are queued: the batch exists and is answered as
    validating, for the sweep to validate again. A 500 here made the SDK retry, each retry one
    more batch stuck behind the same failure."""
    assert fleet.gateway is not None
    f = await client.files.create(file=("in.jsonl", jsonl([request(0)])), purpose="batch")  # opens the stores
    lifecycle = fleet.gateway.batches.lifecycle
    real = lifecycle.store.queue_lines

    async def fails_once(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(lifecycle.store, "queue_lines", real)
        raise nats.errors.TimeoutError

    monkeypatch.setattr(lifecycle.store, "queue_lines", fails_once)
    b = await client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert b.status == "validating"
    assert [x.id async for x in client.batches.list()] == [b.id]
    await lifecycle.validate(b.id)  # what the sweep does once the validation's lease has passed
    assert (await wait_until(client, js(fleet), root, b.id)).status == "completed"
