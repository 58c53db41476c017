"""Helpers for Batch API tests: input files, waiting on a batch through the ``openai`` SDK, and
reading its output and error files back."""

from __future__ import annotations

import json
from typing import Any

import openai
from corral.gateway.batch.model import record_decoder
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import NatsServer
from corral.up import FleetOptions, default_sims
from nats.js import JetStreamContext
from openai.types import Batch

from tests.integration.waits import until

FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
LLAMA = "llama3.2:latest"
EMBED = "all-minilm:latest"


def request(
    i: int, endpoint: str = "/v1/chat/completions", model: str = LLAMA, **extra: Any
) -> dict[str, Any]:
    """One input line of an OpenAI batch file."""
    body: dict[str, Any]
    if endpoint == "/v1/chat/completions":
        body = {"model": model, "messages": [{"role": "user", "content": f"say {i}"}], "max_tokens": 4}
    elif endpoint == "/v1/completions":
        body = {"model": model, "prompt": f"say {i}", "max_tokens": 4}
    else:
        body = {"model": model, "input": f"text {i}"}
    return {"custom_id": f"req-{i}", "method": "POST", "url": endpoint, "body": body | extra}


def keyed_fleet(nats_server: NatsServer, root: str) -> FleetOptions:
    """One simulated server (no delays) behind a gateway that asks for API keys."""
    return FleetOptions(
        port=0,
        nats_url=nats_server.url,
        root=root,
        sims=default_sims(1, time_scale=0),
        gateway={"auth": "keys"},
    )


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


async def submit(c: openai.AsyncOpenAI, data: bytes, endpoint: str = "/v1/chat/completions") -> Batch:
    f = await c.files.create(file=("in.jsonl", data), purpose="batch")
    return await c.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


async def wait_until(
    c: openai.AsyncOpenAI,
    js: JetStreamContext,
    root: str,
    batch_id: str,
    statuses: frozenset[str] = FINAL,
    timeout: float = 60.0,
) -> Batch:
    """Wait until the batch's record says one of ``statuses`` (a watch on the batches bucket: woken
    by each change, no polling), then retrieve it through the SDK."""
    kv = await js.key_value(Subjects(root).batches_bucket)
    watcher = await kv.watch(batch_id)
    status = "unknown"

    async def next_record(timeout: float) -> None:
        nonlocal status
        entry = await watcher.updates(timeout=timeout)
        if entry is not None and entry.value:
            status = record_decoder.decode(entry.value).batch.status

    try:
        await until(
            lambda: status in statuses,
            next_record,
            timeout=timeout,
            what=f"batch {batch_id} {'/'.join(sorted(statuses))}",
            state=lambda: status,
        )
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return await c.batches.retrieve(batch_id)


async def outcome(c: openai.AsyncOpenAI, b: Batch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output and error lines of a finished batch."""
    out: list[dict[str, Any]] = []
    err: list[dict[str, Any]] = []
    if b.output_file_id:
        out = [json.loads(x) for x in (await c.files.content(b.output_file_id)).text.splitlines()]
    if b.error_file_id:
        err = [json.loads(x) for x in (await c.files.content(b.error_file_id)).text.splitlines()]
    return out, err


def exactly_once(out: list[dict[str, Any]], err: list[dict[str, Any]], ids: list[str]) -> None:
    """Every custom_id appears exactly once across the output and error files."""
    seen = [x["custom_id"] for x in out + err]
    assert sorted(seen) == sorted(ids), (len(seen), len(ids), sorted(set(ids) ^ set(seen))[:10])
