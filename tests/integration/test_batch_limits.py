"""Batch lines count against their key's limits: a line's reply tokens are added to the tokens per
minute of the key that made the batch, as an interactive request's are."""

from __future__ import annotations

import msgspec
import openai
import pytest
from corral.gateway.access import Window
from corral.gateway.keys import create_key, open_key_buckets
from corral.protocol.subjects import Subjects
from corral.runtime.kvwatch import snapshot
from corral.runtime.natsserver import NatsServer
from corral.up import LocalFleet
from nats.js.kv import KeyValue

from tests.integration.batch_helpers import LLAMA, jsonl, keyed_fleet, outcome, request, submit, wait_until
from tests.integration.fleet_helpers import preload, seen
from tests.integration.waits import until

pytestmark = pytest.mark.integration


async def tokens_counted(kv: KeyValue, name: str) -> int:
    """The tokens every per-minute window of key ``name`` holds (a batch may span two minutes)."""
    windows = await snapshot(kv, f"{name}.>")
    return sum(msgspec.json.decode(e.value, type=Window).tokens for e in windows if e.value)


async def test_a_batch_lines_tokens_count_in_its_keys_tokens_per_minute(
    nats_server: NatsServer, root: str
) -> None:
    async with LocalFleet(keyed_fleet(nats_server, root)) as fleet:
        await preload(fleet, LLAMA)
        gw = fleet.gateway
        assert gw is not None and gw.nc is not None
        js = gw.nc.jetstream()
        buckets = await open_key_buckets(js, Subjects(root))
        # a limit high enough never to refuse: the test is what it counts
        key = await create_key(buckets.keys, "alice", role="user", tpm=1_000_000)
        await seen(gw, key)
        async with openai.AsyncOpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0) as c:
            b = await submit(c, jsonl([request(i) for i in range(3)]))
            b = await wait_until(c, js, root, b.id)
            assert b.status == "completed"
            counted = await tokens_counted(buckets.limits, "alice")
            out, err = await outcome(c, b)
            # the output file quotes every line's usage, but fetching it is no model reply: after
            # it, one chat's tokens are all the key's windows gain
            chat = await c.chat.completions.create(model=LLAMA, messages=[{"role": "user", "content": "hi"}])
            assert chat.usage is not None
            want = counted + chat.usage.prompt_tokens + chat.usage.completion_tokens
            now = [counted]

            async def chat_counted() -> bool:
                now[0] = await tokens_counted(buckets.limits, "alice")
                return now[0] >= want

            watcher = await buckets.limits.watch("alice.>")  # each write to a window wakes the check
            try:
                await until(chat_counted, watcher.updates, timeout=10.0, state=lambda: now[0])
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
            assert now[0] == want
    assert not err and len(out) == 3
    spent = sum(
        line["response"]["body"]["usage"]["prompt_tokens"]
        + line["response"]["body"]["usage"]["completion_tokens"]
        for line in out
    )
    assert spent > 0
    assert counted == spent
