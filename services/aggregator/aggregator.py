"""The aggregator: the fleet's merged views and rolling figures, written to JetStream KV.

It keeps the same KV watch cache of agent states as the gateway, listens to every agent's
``events.request`` (one per finished request) and writes, to the ``{root}_views`` bucket:

- ``tags``, ``ps``, ``v1_models``: the merged Ollama views, whenever the fleet changes (at most
  every `VIEWS_MIN_S`);
- ``status``: ``/api/status``, the fleet at a glance with requests/s, tokens/s and time to first
  token over the last ``stats_window_s`` seconds, every ``views_interval_s``;
- ``rates``: just those figures, for readers that need nothing else (every gateway).

Several aggregators may run at once: each hears every event (plain subscriptions, no queue group)
and computes the same figures; writing a view twice is harmless. The gateway serves tags and ps from
its own watch cache (always as fresh as the agents' KV) and takes ``rates`` from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats.errors
from corral import views
from corral.aggregator.metrics import AggregatorMetrics
from corral.aggregator.settings import AggregatorSettings
from corral.protocol.messages import RequestFinished
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import Buckets, Reopener, ensure_buckets_at_start
from corral.runtime.fleet import FleetView, received_at
from corral.runtime.kvwatch import snapshot
from corral.runtime.nats import NatsAuth, connect, published
from corral.runtime.tasks import cancel_and_wait, supervise
from corral.runtime.workqueue import depths
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()
R = TypeVar("R", views.Rates, views.ModelRate)

# Views are rewritten on fleet changes at most this often: a fleet of a thousand agents changes
# hundreds of times a second (heartbeats alone), and each rewrite is the whole fleet's views.
VIEWS_MIN_S = 0.5
_finished = msgspec.json.Decoder(RequestFinished)


@dataclass(slots=True)
class _Sample:
    at: float
    model: str
    ok: bool
    tokens: int
    ttft_ms: float | None


MIN_SPAN_S = 1.0  # rates over less than a second of watching would be noise


class Window:
    """Finished requests over a sliding window; figures computed on demand."""

    def __init__(self, seconds: float, *, started: float | None = None) -> None:
        self.seconds = seconds
        self._samples: deque[_Sample] = deque()
        self._started = time.time() if started is None else started  # when this window began watching

    def add(self, event: RequestFinished, at: float) -> None:
        ok = 200 <= event.status < 300
        self._samples.append(_Sample(at, event.model, ok, event.eval_count, event.ttft_ms if ok else None))

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0].at < now - self.seconds:
            self._samples.popleft()

    def rates(self, now: float) -> views.Rates:
        self._prune(now)
        by_model: dict[str, list[_Sample]] = {}
        for s in self._samples:
            by_model.setdefault(s.model, []).append(s)
        # the time actually watched: an aggregator up for 5 s of a 60 s window divides by 5, not 60
        span = min(self.seconds, max(now - self._started, MIN_SPAN_S))
        per_model = {m: self._figures(ss, views.ModelRate, span) for m, ss in sorted(by_model.items())}
        return self._figures(
            list(self._samples), views.Rates, span, window_s=round(span, 3), per_model=per_model
        )

    @staticmethod
    def _figures(samples: list[_Sample], cls: type[R], span: float, **extra: Any) -> R:
        ttfts = [s.ttft_ms for s in samples if s.ttft_ms is not None]
        tokens = sum(s.tokens for s in samples)
        return cls(
            requests=len(samples),
            errors=sum(1 for s in samples if not s.ok),
            tokens=tokens,
            requests_per_s=round(len(samples) / span, 3),
            tokens_per_s=round(tokens / span, 3),
            ttft_ms_p50=round(statistics.median(ttfts), 3) if ttfts else None,
            ttft_ms_p95=round(_p95(ttfts), 3) if ttfts else None,
            **extra,
        )


def fuller(
    own: views.Rates, stored: views.Rates | None, stored_age_s: float, window_s: float
) -> views.Rates | None:
    """The figures another aggregator copy wrote (``stored``, ``stored_age_s`` ago) where they cover
    more of the ``window_s`` window than this copy's ``own`` (it started less than a window ago)
    and that copy still rewrites them; else None. Two copies' figures differ only while one is
    new: readers would see them jump between the two at each write."""
    if stored is None or own.window_s >= window_s or stored.window_s <= own.window_s:
        return None
    return views.current(stored, stored_age_s)


def _p95(values: list[float]) -> float:
    """The 95th percentile (inclusive method: a single value is its own)."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=20, method="inclusive")[18]


class Aggregator:
    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.root)
        self.window = Window(settings.stats_window_s)
        self.metrics = AggregatorMetrics()  # served by `corral aggregator --metrics-port`
        self.nc: NATS | None = None
        self._buckets: Buckets | None = None
        self._fleet: FleetView | None = None
        self._task: asyncio.Task[None] | None = None
        self._written: dict[str, bytes] = {}
        self.writes = 0  # rounds of view rewrites the loop made (for tests and logs)
        self._oversize: set[str] = set()  # views too large for a NATS message (warned once each)
        self._stopping = False
        self.lost = asyncio.Event()  # the NATS connection closed for good: the process must exit
        self._reopener: Reopener | None = None  # the buckets again after a NATS restart

    @property
    def fleet(self) -> FleetView:
        assert self._fleet is not None, "aggregator not started"
        return self._fleet

    async def start(self) -> None:
        self.nc = await connect(
            self.settings.nats_url,
            name="corral-aggregator",
            auth=NatsAuth.of(self.settings),
            on_closed=self.lost.set,
            on_reconnected=self._reconnected,
            on_disconnected=self._disconnected,
        )
        replicas = self.settings.js_replicas
        self._buckets = await ensure_buckets_at_start(self.nc.jetstream(), self.subjects, replicas=replicas)
        self._reopener = Reopener(self.nc, self.subjects, self._reopened, replicas=replicas)
        self._reopener.start()
        self._fleet = FleetView(self._buckets.agents)
        await self._fleet.start()
        await self.nc.subscribe(self.subjects.event("request"), cb=published(self._on_finished))
        await self.write()
        self._task = asyncio.create_task(supervise("aggregator views", self._loop), name="aggregator")
        log.info("aggregator ready: %d agents", len(self._fleet.agents()))

    async def stop(self) -> None:
        self._stopping = True
        if self._reopener is not None:
            await self._reopener.stop()
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self._fleet is not None:
            await self._fleet.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):  # closed meanwhile: nothing left to drain
                await self.nc.drain()

    def _disconnected(self) -> None:
        if self._fleet is not None:  # agents' silence while NATS is away is not theirs
            self._fleet.connection_lost()

    def _reconnected(self) -> None:
        """Back on NATS, maybe a restarted one that lost the views bucket: open it again."""
        if self._reopener is not None:
            self._reopener.request()

    def _reopened(self) -> None:
        """The buckets are open again: watch the fleet anew and write every view again (a views
        bucket created again is empty, whatever was written before)."""
        self._written.clear()
        self.fleet.restart()

    async def _on_finished(self, msg: Msg) -> None:
        try:
            event = _finished.decode(msg.data)
        except msgspec.DecodeError:
            log.debug("ignoring undecodable request event")
            return
        self.window.add(event, time.time())
        self.metrics.finished(event, self.fleet)

    async def _loop(self) -> None:
        """Rewrite views on fleet changes, at most every `VIEWS_MIN_S` (or ``views_interval_s``
        when shorter), and at least every ``views_interval_s``. A change that came while a rewrite
        ran is in the next one."""
        spacing = min(VIEWS_MIN_S, self.settings.views_interval_s)
        written = self.fleet.revision  # `start` wrote the views as of this
        while not self._stopping:
            if self.fleet.revision == written:
                await self.fleet.wait_changed(self.settings.views_interval_s)
            if self._stopping:
                return
            began, written = time.monotonic(), self.fleet.revision
            try:
                await self.write()
            except nats.errors.Error as e:  # NATS away for a moment: the next round writes again
                # (nats-py may turn a cancellation into its own error: hence the flag above)
                if self._reopener is None or not self._reopener.missing(e):
                    log.warning("writing views failed: %s", e)
            self.writes += 1
            await asyncio.sleep(max(began + spacing - time.monotonic(), 0.0))  # changes gather

    async def _fuller_rates(self, own: views.Rates) -> views.Rates | None:
        """`fuller` over the rates in the views bucket now (a snapshot, not a get: its entry carries
        when the server stored it, so a stopped copy's last figures show their age)."""
        assert self._buckets is not None
        entries = await snapshot(self._buckets.views, views.RATES_KEY, timeout=2.0)
        if not entries or not entries[-1].value:
            return None
        try:
            stored = views.rates_decoder.decode(entries[-1].value)
        except msgspec.DecodeError:
            return None
        age = time.monotonic() - received_at(entries[-1], snapshot=True)
        return fuller(own, stored, age, self.window.seconds)

    async def write(self) -> None:
        assert self._buckets is not None and self.nc is not None
        agents = self.fleet.agents()
        rates = msgspec.structs.replace(
            self.window.rates(time.time()), every_s=self.settings.views_interval_s
        )
        theirs = await self._fuller_rates(rates) if rates.window_s < self.window.seconds else None
        out = {
            views.RATES_KEY: _enc.encode(theirs or rates),  # first: every gateway reads it
            "tags": views.tags_body(agents),
            "ps": views.ps_body(agents),
            "v1_models": views.v1_models_body(agents),
            views.STATUS_KEY: views.status_body(
                agents,
                theirs or rates,
                views.queue_by_model(await depths(self.nc, self.subjects)),
            ),
        }
        if theirs is not None:  # the copy that wrote them rewrites them
            del out[views.RATES_KEY]
        for key, value in out.items():
            # the rates go out every time, changed or not: their age is how readers tell a live
            # aggregator of a quiet fleet from a stopped one (`corral.views.current`)
            if key != views.RATES_KEY and self._written.get(key) == value:
                continue
            try:
                await self._buckets.views.put(key, value)
            except nats.errors.MaxPayloadError:  # a large fleet's ps or status: the others still go
                if key not in self._oversize:
                    log.warning("view %s not written: %d bytes, over NATS's max_payload", key, len(value))
                self._oversize.add(key)
                continue
            self._oversize.discard(key)
            self._written[key] = value
