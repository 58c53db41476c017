"""The model index: for every model, which agents have it on disk and which have it loaded.

The registry keeps it in the ``{root}_models`` KV bucket, one key per model, ``model.{token}``
(``token`` is `ModelName.token`), the value a `ModelEntry` as JSON, so other services and an
operator (``nats kv get``) can ask "who has llama3.2?" without reading every agent's state::

    model.llama3=2E2=3Alatest  {"model": "llama3.2:latest",
                                "disk": [{"agent": "amd-1", "vendor": "amd"}, ...],
                                "loaded": [{"agent": "nvidia-0", "vendor": "nvidia"}]}

`model_index` is the pure part: agent states in, entries out. `ModelIndexWriter` follows the
agents bucket with its own KV watch and keeps the ``model.*`` keys equal to ``model_index`` of it:

- membership is the bucket's: an agent counts until its key is gone (it stopped, or the registry
  removed it as dead), so the index changes with the registry's judgement, not with a clock;
- an entry is written only when it changes (a heartbeat that changes no model on disk or in memory
  costs a comparison, no write) and deleted when no agent has the model any more;
- only keys under ``model.`` are ever written or deleted; other keys in the bucket (load markers)
  belong to someone else.

Several registries may run one each. Every write is a compare-and-set on the revision the writer
last knew; when it fails another copy wrote first, so the writer reads the key again and writes
only if it still says something else. Two copies that agree therefore write each change once, and
copies that briefly disagree (one has not seen an agent's latest state yet) end on the same entry:
each rewrites its entry whenever its own view changes, so the last write comes from an up-to-date
view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

import msgspec
import nats.errors
from corral.protocol.messages import AgentState, agent_state_of
from corral.protocol.names import encode_token, key_of
from corral.runtime.buckets import kv_create
from corral.runtime.kvwatch import snapshot, watch_forever, watching
from corral.runtime.tasks import cancel_and_wait, supervise
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

PREFIX = "model."
_CAS_ATTEMPTS = 3  # per key and round; a key still contended is tried again on the next change


class Holder(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    vendor: str


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """Value of ``{root}_models`` / key ``model.{token}``; agents sorted by id."""

    model: str  # the model key: the lower-cased display name, e.g. ``llama3.2:latest``
    disk: tuple[Holder, ...] = ()
    loaded: tuple[Holder, ...] = ()


model_entry_encoder = msgspec.json.Encoder()
model_entry_decoder = msgspec.json.Decoder(ModelEntry)

Holdings = tuple[str, tuple[str, ...], tuple[str, ...]]


def index_key(token: str) -> str:
    """The KV key of one model's entry."""
    return PREFIX + token


def holdings(state: AgentState) -> Holdings:
    """What of an agent's state the index depends on: its vendor, its models on disk and loaded."""
    return (
        state.vendor,
        tuple(sorted(m.name for m in state.models)),
        tuple(sorted(m.name for m in state.loaded)),
    )


def model_index(agents: Iterable[AgentState]) -> dict[str, ModelEntry]:
    """KV key → entry for every model some agent has on disk or loaded (unparseable names skipped)."""
    disk: dict[str, dict[str, Holder]] = {}
    loaded: dict[str, dict[str, Holder]] = {}
    tokens: dict[str, str] = {}
    for a in agents:
        holder = Holder(agent=a.id, vendor=a.vendor)
        for index, names in ((disk, a.models), (loaded, a.loaded)):
            for m in names:
                key = key_of(m.name)
                if key is None:  # not a valid Ollama name: indexed nowhere, as it is routed nowhere
                    continue
                tokens[key] = encode_token(key)
                index.setdefault(key, {})[a.id] = holder
    return {
        index_key(tokens[key]): ModelEntry(
            model=key,
            disk=tuple(h for _, h in sorted(disk.get(key, {}).items())),
            loaded=tuple(h for _, h in sorted(loaded.get(key, {}).items())),
        )
        for key in sorted(tokens)
    }


class ModelIndexWriter:
    """Keeps the ``model.*`` keys of ``models`` equal to `model_index` of the ``agents`` bucket."""

    def __init__(self, agents: KeyValue, models: KeyValue) -> None:
        self._agents_kv = agents
        self._kv = models
        self._agents: dict[str, AgentState] = {}
        self._holdings: dict[str, Holdings] = {}
        self._stored: dict[str, tuple[int, bytes]] | None = None  # key → (revision, value) as last known
        self._dirty = asyncio.Event()
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._rewatch = asyncio.Event()

    async def start(self, timeout: float = 10.0) -> None:
        """Follow the agents bucket; returns once the current fleet has been read."""
        self._tasks.append(
            asyncio.create_task(
                supervise("model index watch", self._follow, wake=self._rewatch), name="model-index-watch"
            )
        )
        await asyncio.wait_for(self._synced.wait(), timeout)
        self._tasks.append(asyncio.create_task(self._loop(), name="model-index"))

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    def observe(self, agent_id: str, state: AgentState | None) -> None:
        """An agent's latest state (None: it is gone); marks the index dirty if its models changed."""
        if state is None:
            self._agents.pop(agent_id, None)
            if self._holdings.pop(agent_id, None) is not None:
                self._dirty.set()
            return
        self._agents[agent_id] = state
        held = holdings(state)
        if self._holdings.get(agent_id) != held:
            self._holdings[agent_id] = held
            self._dirty.set()

    def restart(self) -> None:
        """Watch the agents bucket anew (after the buckets were opened again on a restarted NATS);
        the index itself is kept in files and survives."""
        self._rewatch.set()

    async def _follow(self) -> None:
        await watch_forever(self._watch, self._rewatch)

    async def _watch(self) -> None:
        seen: set[str] | None = set()  # the snapshot's agents, until it ends
        async with watching(self._agents_kv) as watcher:
            async for entry in watcher:
                if entry is None:  # end of the initial snapshot: write once even if nothing is held
                    for gone in set(self._agents) - (seen or set()):
                        self.observe(gone, None)
                    seen = None
                    self._synced.set()
                    self._dirty.set()
                    continue
                if seen is not None:
                    seen.add(entry.key)
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self.observe(entry.key, None)
                else:
                    try:
                        self.observe(entry.key, agent_state_of(entry.key, entry.value))
                    except msgspec.DecodeError as e:
                        log.warning("model index: ignoring agent state for %s: %s", entry.key, e)

    async def _loop(self) -> None:
        while not self._stopping:
            await self._dirty.wait()
            self._dirty.clear()
            if self._stopping:
                return
            try:
                await self.write(model_index(self._agents.values()))
            except nats.errors.Error as e:  # NATS away for a moment: try again on the next change, or soon
                log.warning("writing the model index failed: %s", e)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._dirty.wait()
                self._dirty.set()

    async def write(self, entries: Mapping[str, ModelEntry]) -> int:
        """Make the ``model.*`` keys say exactly ``entries``; returns how many writes that took."""
        if self._stored is None:
            self._stored = await self._load()
        wanted = {key: model_entry_encoder.encode(e) for key, e in entries.items()}
        done = 0
        for key in sorted(wanted.keys() | self._stored.keys()):
            for _ in range(_CAS_ATTEMPTS):
                known = self._stored.get(key)
                value = wanted.get(key)
                if (known[1] if known else None) == value:
                    break
                try:
                    await self._put(key, value, known)
                except APIError:  # wrong last revision: another copy wrote first; see what it wrote
                    await self._reread(key)
                    continue
                done += 1
                break
            else:  # contended every time: the next change to the fleet tries again
                log.debug("model index: %s still contended", key)
        return done

    async def _put(self, key: str, value: bytes | None, known: tuple[int, bytes] | None) -> None:
        assert self._stored is not None
        if value is None:
            assert known is not None
            await self._kv.delete(key, last=known[0])
            del self._stored[key]
        elif known is None:
            self._stored[key] = (await kv_create(self._kv, key, value), value)
        else:
            self._stored[key] = (await self._kv.update(key, value, last=known[0]), value)

    async def _reread(self, key: str) -> None:
        assert self._stored is not None
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:  # absent or deleted
            self._stored.pop(key, None)
            return
        self._stored[key] = (entry.revision or 0, entry.value or b"")

    async def _load(self) -> dict[str, tuple[int, bytes]]:
        """The ``model.*`` entries in the bucket now (a restarted registry rewrites none of them)."""
        return {e.key: (e.revision or 0, e.value or b"") for e in await snapshot(self._kv, PREFIX + ">")}
