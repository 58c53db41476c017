"""API keys at the gateway's door (``CORRAL_AUTH=keys``): every HTTP request but ``/`` and
``/ready`` needs ``Authorization: Bearer <key>``, its key's role must allow the call, and its key's
limits must leave room; the app then finds the key under `KEY` in the scope (model allow-lists and
the views a user sees, `corral.gateway.userviews`) and sets the model it served under `MODEL`.

Refusals come before the body is read, Ollama-style (``{"error": ...}``; /v1's error object):
401 for a missing or unknown key, 403 for a user key on an admin call, 429 with ``Retry-After``
over a limit. Each answered request adds to its key's usage, and its reply's tokens to its
key's tokens per minute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from corral.gateway.access import (
    TAIL_BYTES,
    ApiKey,
    is_open,
    limited,
    model_allowed,
    presented_key,
    reply_tokens,
    user_may,
)
from corral.gateway.asgi import App, Message, Receive, Scope, Send
from corral.gateway.errors import dialect, refuse
from corral.gateway.keys import KeyBuckets, KeyStore
from corral.gateway.limits import Limited, Limiter, UsageBook
from corral.runtime.kvwatch import watch_forever
from corral.runtime.tasks import cancel_and_wait, supervise

log = logging.getLogger(__name__)


KEY = "corral.key"  # the scope key under which the app finds the request's `ApiKey`
MODEL = "corral.model"  # ... and under which it leaves the model it served (for usage)
USAGE_FLUSH_S = 1.0  # how often usage is added to the usage bucket
UNAUTHORIZED = "unauthorized: a valid API key is required (Authorization: Bearer <key>, or x-api-key: <key>)"


def key_of(scope: Mapping[str, Any]) -> ApiKey | None:
    """The request's key; None when keys are off."""
    key: ApiKey | None = scope.get(KEY)
    return key


def hides(scope: Mapping[str, Any], model: str) -> bool:
    """Whether the request's key may not see ``model``: it then answers as if the model were absent."""
    key = key_of(scope)
    return key is not None and not model_allowed(key.models, model)


class _Meter:
    """Wraps ``send``: the reply's status and the last `TAIL_BYTES` of its body (its token counts)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        self.tail = b""

    async def send(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.status = msg["status"]
        elif msg["type"] == "http.response.body":
            body: bytes = msg.get("body", b"")
            if body:
                self.tail = (self.tail + body)[-TAIL_BYTES:] if len(body) < TAIL_BYTES else body[-TAIL_BYTES:]
        await self._send(msg)


class Access:
    """The keys, limits and usage of one gateway; `serve` wraps the rest of the gateway."""

    def __init__(self, buckets: KeyBuckets) -> None:
        self.keys = KeyStore(buckets.keys)
        self.limiter = Limiter(buckets.limits)
        self.usage = UsageBook(buckets.usage)
        self._restart = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 10.0) -> None:
        """Start the keys watch and the usage flush; returns once the keys are loaded."""
        self._tasks = [
            asyncio.create_task(
                supervise(
                    "keys watch",
                    lambda: watch_forever(self.keys.watch_once, self._restart),
                    wake=self._restart,
                ),
                name="keys-watch",
            ),
            asyncio.create_task(supervise("usage flush", self._flush_loop), name="usage-flush"),
        ]
        async with asyncio.timeout(timeout):
            await self.keys.loaded.wait()

    def restart(self) -> None:
        """Watch the keys bucket again (the buckets were opened again after a reconnect)."""
        self._restart.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self.usage.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)  # a period, not a wait for readiness
            await self.usage.flush()

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: App) -> None:
        method, path = scope["method"], scope["path"]
        if is_open(path):
            await app(scope, receive, send)
            return
        api = dialect(path)
        closing = method not in ("GET", "HEAD")
        token = presented_key(scope["headers"])
        key = self.keys.lookup(token) if token else None
        if key is None:
            challenge = [(b"www-authenticate", b"Bearer")]
            await refuse(send, 401, UNAUTHORIZED, api=api, close=closing, headers=challenge)
            return
        if not key.admin and not user_may(method, path):
            message = f"forbidden: this API key may not call {method} {path}"
            await refuse(send, 403, message, api=api, close=closing)
            return
        counted = limited(method, path)
        if counted:
            try:
                await self.limiter.admit(key)
            except Limited as e:
                self.usage.record(key.name, "", prompt=0, generated=0, error=True)
                later = [(b"retry-after", str(e.retry_after).encode())]
                await refuse(send, 429, e.message, api=api, close=closing, headers=later)
                return
        scope[KEY] = key
        meter = _Meter(send)
        try:
            await app(scope, receive, meter.send)
        finally:
            if counted:
                self.limiter.release(key)
            tokens = self.record(key, scope, meter.status, meter.tail)
        await self.count_tokens(key, tokens)

    def record(self, key: ApiKey, scope: Scope, status: int, tail: bytes) -> int:
        """Add an answered request of ``key`` (``tail``: its reply's last `TAIL_BYTES`) to its usage,
        under the model the app left in ``scope``; returns its reply's tokens (for `count_tokens`).
        Only a model's reply has tokens: a file or listing that merely quotes some (a batch's
        output file ends with a line's ``usage``) counts none."""
        model: str = scope.get(MODEL, "")
        prompt, generated = reply_tokens(tail) if status == 200 and model else (0, 0)
        self.usage.record(key.name, model, prompt=prompt, generated=generated, error=status >= 400)
        return prompt + generated

    async def count_tokens(self, key: ApiKey, tokens: int) -> None:
        """Add a reply's ``tokens`` to its key's tokens per minute (when the key has that limit)."""
        if key.tpm and tokens:
            await self.limiter.add_tokens(key, tokens)
