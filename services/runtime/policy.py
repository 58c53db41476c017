"""The fleet's model policy record: aliases, fallbacks and pins in one KV record (`POLICY_KEY` in
the policy bucket) that ``corral alias``, ``corral fallback`` and ``corral pin`` write, and
`PolicyStore`, a live copy of it kept by a KV watch. The gateway reads its aliases and fallbacks
(`corral.gateway.policy`), the registry its pins (`corral.registry.pins`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import msgspec
from corral.runtime.kvwatch import watch_forever, watching
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.views.status import Pin
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

POLICY_KEY: Final = "rules"  # the one record in the policy bucket


class Policy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The fleet's rules, by normalised model key (``llama3.2:latest``): alias → the model that
    serves it; model → the models that serve it, in order, when it cannot start in time; model →
    how many agents keep it loaded."""

    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    fallbacks: dict[str, tuple[str, ...]] = msgspec.field(default_factory=dict)
    pins: dict[str, Pin] = msgspec.field(default_factory=dict)


policy_decoder = msgspec.json.Decoder(Policy)
policy_encoder = msgspec.json.Encoder()


class PolicyStore:
    """The policy bucket's record, kept by a KV watch (`watch`, or `start` for a supervised task of
    its own): a change made anywhere reaches every copy as a KV event, and ``on_change`` is told each
    new value."""

    def __init__(self, kv: KeyValue, *, on_change: Callable[[Policy], None] | None = None) -> None:
        self.kv = kv
        self.policy = Policy()
        self.loaded = asyncio.Event()  # the first value (or its absence) is in
        self._on_change = on_change
        self._changed = asyncio.Event()
        self._restart = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the watch; returns once the rules are loaded."""
        self._task = asyncio.create_task(
            supervise("policy watch", self.watch, wake=self._restart), name="policy-watch"
        )
        async with asyncio.timeout(timeout):
            await self.loaded.wait()

    def restart(self) -> None:
        """Watch the bucket again (it was opened again after a reconnect)."""
        self._restart.set()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def wait_for(self, predicate: Callable[[Policy], bool], timeout: float) -> Policy:
        """Wait until the rules satisfy ``predicate`` (woken by each KV event; tests)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.policy):
                self._changed.clear()
                await self._changed.wait()
        return self.policy

    async def watch(self) -> None:
        """Follow the record for ever, from its current value again after each `restart`."""
        await watch_forever(self.watch_once, self._restart)

    async def watch_once(self) -> None:
        async with watching(self.kv, POLICY_KEY) as watcher:
            async for entry in watcher:
                if entry is None:  # the initial value is in (None when there is none)
                    self.loaded.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.policy = Policy()
                else:
                    try:
                        self.policy = policy_decoder.decode(entry.value)
                    except msgspec.DecodeError:
                        log.warning("ignoring an undecodable policy record; the rules stay as they were")
                        continue
                log.info(
                    "model policy: %d aliases, %d fallback lists, %d pins",
                    len(self.policy.aliases),
                    len(self.policy.fallbacks),
                    len(self.policy.pins),
                )
                if self._on_change is not None:
                    self._on_change(self.policy)
                self._changed.set()
