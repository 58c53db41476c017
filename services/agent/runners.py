"""What the agent's Ollama has loaded, and which of those runners a request may be sent to now.

A pure state machine, no I/O: the agent feeds it facts — an /api/ps reading (`observe`), "this
request will run" (`will_run`), "Ollama answered it" (`responded`), "it ended" (`ended`) — and each
method returns a `RunnerChange` saying what the agent must act on.

Ollama lists a runner in /api/ps from the moment its load begins, so a listed model is not yet
ready: a model is *ready* when it is listed and none of our requests waits on its load, or once
Ollama has answered a request on it. A model is *warm* — claimable by requests that give no
num_ctx — when it is ready and its runner runs at the context such a request gets (the learned or
assumed default, capped at the trained context); any other runner would reload for it.

It also keeps how long each model's last load here took (`load_s`): the request that started a load
reports, when it is served, how long the load took by its reply (`corral.agent.worker.reply_load_s`);
and how long a request of each model holds a slot once it is loaded (`request_s`: the median of the
last `REQUEST_SAMPLES` answered, their load left out), what the router's queue waits are made of.

A model stays *busy* — not to be evicted, for routers reading the agent's state — for one of its
request times after its last request here ended (`lingering`): a steady stream of requests that is
between two of them when a router looks is not an idle model (routers let idle models go first,
and a busy one only where nothing else makes room).

A load this agent sends its Ollama may unload other models first (`evicted_by`: Ollama's fit rule on
the agent's own state). Those *yield* until the load ends (`yields`): they are no longer warm, so
the agent claims nothing for them, and a request for one that reaches it anyway is turned away
(answered busy, so it goes elsewhere). Sent to Ollama, it would wait behind the load and then unload
the newcomer to load its own model back, before the requests the newcomer was loaded for ran.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from corral.protocol.messages import AgentState, PsModel
from corral.protocol.names import decode_token, encode_token, key_of
from corral.protocol.runners import effective_ctx, spilled_share
from corral.routing import TYPICAL_REQUEST_S, Route, load_plan

log = logging.getLogger(__name__)

REQUEST_SAMPLES = 16  # answered requests per model whose median is `RunnerTracker.request_s`
EXPIRY_MARGIN_S = 0.05  # Ollama is read again this long after a runner's keep_alive runs out
EXPIRED_AGAIN_S = 0.5  # and this often while one past it is still listed (its unload under way)


class RunnerChange(NamedTuple):
    state: bool = False  # what the agent advertises changed
    claims: bool = False  # the set of warm models changed: claim subscriptions follow it
    refresh: bool = False  # re-read Ollama now (a model became ready, or showed its default context)

    def __or__(self, other: tuple[bool, ...]) -> RunnerChange:
        return RunnerChange(*(a or b for a, b in zip(self, other, strict=True)))


NOTHING = RunnerChange()


def expires_ts(text: str) -> float | None:
    """A runner's ``expires_at`` as a Unix time; None when it cannot be read."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def until_expiry(loaded: Sequence[PsModel], now: float, longest: float) -> float:
    """Seconds until Ollama should be read again for its runners' expiries, so that a runner whose
    keep_alive ran out stops being advertised then: just after the soonest expiry to come; soon
    again while one past its expiry is still listed, for at most ``longest`` after it (a clock
    apart from Ollama's must not keep the agent reading); else ``longest``."""
    wait = longest
    for m in loaded:
        at = expires_ts(m.expires_at)
        if at is None:
            continue
        if at >= now:
            wait = min(wait, at - now + EXPIRY_MARGIN_S)
        elif now - at < longest:
            wait = min(wait, EXPIRED_AGAIN_S)
    return wait


def evicted_by(token: str, num_ctx: int, state: AgentState) -> set[str]:
    """Tokens of the models the agent's Ollama unloads before it loads ``token``'s model for a
    request asking ``num_ctx`` (0: the default), by Ollama's fit rule on the agent's ``state``."""
    plan = load_plan(Route(key=decode_token(token), num_ctx=num_ctx or None), state)
    return {encode_token(k) for k in plan.evicts} - {token}


def token_of(name: str) -> str | None:
    key = key_of(name)  # memoised: names repeat on every /api/ps read
    return encode_token(key) if key is not None else None


class RunnerTracker:
    # Seventeen attributes: what the last /api/ps reading says (loaded, ready, warm, offloaded,
    # trained, the default context, and whether a GPU serves them), what requests taught it (learned
    # contexts, load and request times with their samples, when each model's last request ended),
    # and the loads under way (their waiters and starters, the models they unload, news of a model
    # ready, default-context runs not yet seen in a reading).
    def __init__(self, default_num_ctx: int = 4096, *, on_gpu: bool = True) -> None:
        # the num_ctx this backend is assumed to give requests without one (configuration, VRAM)
        self.default_num_ctx = default_num_ctx
        self.on_gpu = on_gpu  # a GPU's backend, where a runner partly in system RAM is a slow one
        self.loaded: tuple[PsModel, ...] = ()  # the last /api/ps reading
        self.ready: set[str] = set()  # tokens of the models Ollama has finished loading
        self.warm: frozenset[str] = frozenset()  # ready at the default context (`claimable`)
        self.offloaded: frozenset[str] = frozenset()  # runners partly in system RAM (on a GPU)
        self.trained: dict[str, int] = {}  # loaded model key → trained context
        self.learned_ctx: dict[str, int] = {}  # model key → runner context seen without num_ctx
        # token → {request id: (its num_ctx or 0, the context it needs)} of the requests waiting on
        # a load (or reload) of that model, oldest first: the first one's context is loading now
        self._load_waiters: dict[str, dict[str, tuple[int, int]]] = {}
        self._ran_default: set[str] = set()  # tokens just served without num_ctx (not yet warm)
        self._ready_news = False  # a model became ready since the last reading
        # request id → (token, context) of the load (or reload) it started
        self._loaders: dict[str, tuple[str, int]] = {}
        self.load_s: dict[str, float] = {}  # model key → seconds its last load here took
        self.request_s: dict[str, float] = {}  # model key → median seconds a request of it held a slot
        self._held: dict[str, deque[float]] = {}  # model key → its last requests' seconds in a slot
        self._ended_at: dict[str, float] = {}  # token → when its last request here ended (monotonic)
        self.yielding: dict[str, str] = {}  # token of a model a load under way unloads → the load's token

    def wanted_ctx(self, key: str, num_ctx: int, trained: int | None = None) -> int:
        """The context Ollama gives ``key``'s runner for a request asking ``num_ctx`` (0: the default
        — as observed, else as assumed), capped at the trained context (``trained``, else the last
        one read)."""
        if trained is None:
            trained = self.trained.get(key, 0)
        if num_ctx:
            return effective_ctx(num_ctx, trained)
        return self.learned_ctx.get(key) or effective_ctx(self.default_num_ctx, trained)

    @property
    def claimable(self) -> frozenset[str]:
        """The warm models whose free slots the agent offers on the shared claim subjects: not one
        running partly in system RAM, which decodes several times slower; NATS would hand it
        requests while a card with the model wholly in VRAM has free slots. It still serves what
        the router sends it and the fleet queue (else a model that spills everywhere would have
        nobody to take its waiting requests)."""
        return self.warm - self.offloaded if self.offloaded else self.warm

    def waits_on_load(self, token: str) -> bool:
        return token in self._load_waiters

    def yields(self, token: str) -> bool:
        """A load under way here unloads ``token``'s model first: its requests must go elsewhere."""
        return token in self.yielding

    def shows_late(self, token: str | None, rid: str) -> bool:
        """Request ``rid`` started a load of ``token``'s model, which Ollama answered (`responded`:
        not a load that failed) and the last reading does not list at that context (not at all, or
        the runner a reload replaced): Ollama has it loaded now, and what the agent advertises does
        not say so."""
        loader = self._loaders.get(rid)
        if token is None or loader is None or loader[0] != token or token not in self.ready:
            return False
        runner = self._listed(token)
        return runner is None or runner.context_length not in (0, loader[1])

    def _listed(self, token: str) -> PsModel | None:
        """The runner of ``token``'s model in the last reading, if it lists one."""
        return next((m for m in self.loaded if token_of(m.name) == token), None)

    # -- facts about requests --------------------------------------------------------------
    def will_run(
        self, token: str, rid: str, num_ctx: int, evicts: Callable[[], Collection[str]] = frozenset
    ) -> RunnerChange:
        """Before request ``rid`` reaches Ollama: will it load its model, or reload the runner at
        another context? Then the model is loading — for that context — until Ollama answers, and
        the models the load unloads (``evicts()``, asked only for a load) yield until it ends."""
        if not num_ctx and token in self.warm and token not in self._load_waiters:
            return NOTHING  # the common case: a default request on a warm default runner
        key = decode_token(token)
        want = self.wanted_ctx(key, num_ctx)
        change = RunnerChange(state=True)
        if token not in self._load_waiters and token in self.ready:
            runner = self._listed(token)
            if runner is not None and runner.context_length in (0, want):
                return NOTHING  # a runner that serves it is loaded
            # a runner at another context (a reload), or none since the last /api/ps (a load)
            self.ready.discard(token)
            if token in self.warm:
                self.warm = self.warm - {token}
                change = RunnerChange(state=True, claims=True)
        if token not in self._load_waiters:
            self._loaders[rid] = (token, want)  # the first to wait on the load is the one that starts it
            gone = {t for t in evicts() if t != token and t not in self.yielding}
            self.yielding.update(dict.fromkeys(gone, token))
            if gone & self.warm:
                self.warm -= gone
                change = RunnerChange(state=True, claims=True)
        self._load_waiters.setdefault(token, {})[rid] = (num_ctx, want)
        return change

    def _load_over(self, token: str) -> RunnerChange:
        """The load of ``token``'s model ended (loaded, failed, or nobody waits on it): the models
        it unloads yield no more; read Ollama to see which are gone."""
        before = len(self.yielding)
        self.yielding = {t: by for t, by in self.yielding.items() if by != token}
        return RunnerChange(state=True, claims=True, refresh=True) if len(self.yielding) < before else NOTHING

    def responded(self, token: str, rid: str, status: int) -> RunnerChange:
        """Ollama's answer to ``rid`` began with ``status``: a model it had to load is loaded."""
        if status >= 400:
            return NOTHING
        change = NOTHING
        waiters = self._load_waiters.get(token)
        if waiters is not None:
            mine = waiters.pop(rid, None)
            if mine is None:
                return NOTHING  # answered on the runner before the load this model waits on
            # the runner now has this request's context: those waiting for the same context run on
            # it; any waiting for another context wait on a reload after it
            waiters = {r: w for r, w in waiters.items() if w[1] != mine[1]}
            change = RunnerChange(state=True) | self._load_over(token)
            if waiters:
                self._load_waiters[token] = waiters
                return change
            del self._load_waiters[token]
        if token not in self.ready:
            self.ready.add(token)  # Ollama answers only once the model is loaded
            # advertised by the reading this asks for, together with Ollama's /api/ps: a state that
            # says "not loading" must also list the runner, or the model looks absent meanwhile
            self._ready_news = True
            change = change | RunnerChange(refresh=True)
        return change

    def ended(self, token: str, rid: str, at: float | None = None) -> RunnerChange:
        """``rid`` ended (``at``: when, on the caller's monotonic clock): it waits on no load any
        more, and its model lingers busy from then (`lingering`)."""
        if at is not None:
            self._ended_at[token] = at
        self._loaders.pop(rid, None)
        waiters = self._load_waiters.get(token)
        if waiters is not None and waiters.pop(rid, None) is not None and not waiters:
            del self._load_waiters[token]
            return RunnerChange(state=True) | self._load_over(token)
        return NOTHING

    def served(
        self,
        token: str,
        num_ctx: int,
        status: int,
        rid: str = "",
        load_s: float | None = None,
        ran_s: float = 0.0,
    ) -> RunnerChange:
        """Request ``rid`` finished with ``status``; one served at the default context on a model
        not yet warm shows, in the next reading, the context Ollama really gives such requests.
        ``load_s``: how long it waited for the model to load, by its reply (kept as the model's load
        time when ``rid`` started the load); ``ran_s``: how long Ollama took to answer it, that wait
        included (`request_s` keeps the rest)."""
        change = NOTHING
        key = decode_token(token)
        waited = load_s if load_s is not None and load_s > 0 else 0.0
        loader = self._loaders.pop(rid, None)
        if loader is not None and loader[0] == token and waited and status == 200:
            self.load_s[key] = round(waited, 3)
            change = RunnerChange(state=True)
        if status == 200 and ran_s > 0:
            held = ran_s - waited
            if held > 0:
                samples = self._held.setdefault(key, deque(maxlen=REQUEST_SAMPLES))
                samples.append(held)
                self.request_s[key] = round(statistics.median(samples), 3)
        if status == 200 and not num_ctx and token not in self.warm:
            self._ran_default.add(token)
            return change | RunnerChange(refresh=True)
        return change

    # -- facts about Ollama ----------------------------------------------------------------
    def observe(
        self,
        loaded: Sequence[PsModel],
        trained: Mapping[str, int],
        busy: Collection[str],
        default_num_ctx: int,
    ) -> RunnerChange:
        """A reading of /api/ps (``trained``: model name → its trained context, 0 = unknown) while
        the models ``busy`` have requests holding slots here."""
        self.default_num_ctx = default_num_ctx
        tokens, warm, offloaded = set(), set(), set()
        state = False
        by_key: dict[str, int] = {}
        for m in loaded:
            key = key_of(m.name)
            if key is None:
                continue  # not a name Ollama's clients could ask for: advertised nowhere
            token = encode_token(key)
            tokens.add(token)
            by_key[key] = trained.get(m.name, 0)
            assumed = effective_ctx(default_num_ctx, by_key[key])
            if token in self._ran_default and m.context_length:
                state = self._learn_default(key, m.context_length, assumed) or state
            # a request without num_ctx runs at the default; any other runner would reload
            if m.context_length in (0, self.wanted_ctx(key, 0, by_key[key])):
                warm.add(token)
            if spilled_share(m.size, m.size_vram, on_gpu=self.on_gpu):
                offloaded.add(token)
        self._ran_default.clear()
        if by_key != self.trained:
            self.trained, state = by_key, True
        # a listed model none of our requests waits on is loaded; one a request of ours waits on
        # stays loading until Ollama answers (`responded`); an unlisted idle one is gone
        ready = {t for t in self.ready if t in tokens or t in busy}
        ready |= {t for t in tokens if t not in busy}
        warm &= ready
        warm -= self.yielding.keys()
        if tuple(loaded) != self.loaded:
            self.loaded, state = tuple(loaded), True
        if ready != self.ready or self._ready_news:
            self.ready, self._ready_news, state = ready, False, True
        claims = warm != self.warm or offloaded != self.offloaded
        self.warm, self.offloaded = frozenset(warm), frozenset(offloaded)
        return RunnerChange(state=state, claims=claims)

    def _learn_default(self, key: str, seen: int, assumed: int) -> bool:
        """A request without num_ctx ran on a runner of ``seen`` context: that is this backend's
        default for ``key``, whatever the configuration made us assume."""
        if self.learned_ctx.get(key) == seen:
            return False
        if seen != assumed:
            log.warning(
                "%s: requests without num_ctx run at context %d here, not the %d assumed; using what "
                "Ollama does (set CORRAL_CONTEXT_LENGTH to that Ollama's OLLAMA_CONTEXT_LENGTH)",
                key,
                seen,
                assumed,
            )
        self.learned_ctx[key] = seen
        return True

    # -- what the agent advertises ---------------------------------------------------------
    def busy_models(self, busy: Collection[str], now: float) -> tuple[str, ...]:
        """Model keys not to be evicted here: those of the tokens ``busy`` (requests holding slots
        now) and the `lingering` ones, sorted."""
        return tuple(sorted(decode_token(t) for t in {*busy, *self.lingering(now)}))

    def lingering(self, now: float) -> set[str]:
        """Tokens of the models still loaded here whose last request ended less than one of their
        request times (`request_s`, `TYPICAL_REQUEST_S` before one is known) before ``now``."""
        out = set()
        for token, at in list(self._ended_at.items()):
            if token in self.ready and now - at < self.request_s.get(decode_token(token), TYPICAL_REQUEST_S):
                out.add(token)
            else:
                del self._ended_at[token]
        return out

    def loading(self, busy: Collection[str]) -> tuple[str, ...]:
        """Model keys with requests here that Ollama has not finished loading."""
        return tuple(decode_token(t) for t in busy if t not in self.ready)

    def loading_ctx(self) -> dict[str, int]:
        """Model key → the num_ctx its load runs at (the oldest waiter's: its load runs first)."""
        return {
            decode_token(t): next(iter(w.values()))[0]
            for t, w in self._load_waiters.items()
            if w and t not in self.ready
        }
