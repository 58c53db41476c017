"""The agent's interest in work: claim subscriptions for free slots, and the fleet queue.

For every warm model the agent holds one single-shot queue subscription per free slot on
``work.any.{model}`` and ``work.{vendor}.{model}``: NATS gives each request to exactly one agent
that can start it now, in proportion to free slots, and answers "no responders" when none can. A
subscription is armed with ``UNSUB <sid> 1`` so the server retires it after one delivery, and it
is taken out of service without losing a delivery (`corral.runtime.singleshot`): one that fires
twice, or after the agent took interest back, is served if a slot is free, else answered ``busy``
and the gateway moves on.

Requests no agent could take wait in the fleet queue (a JetStream work queue per model). The agent
listens for the nudges sent when one is queued, and before it takes interest in new work for a
model it takes that model's queued requests, oldest first, up to its free slots. A take the queue
did not answer (JetStream electing a leader, say) is tried again `TAKE_RETRY_S` later (twice that
after the next, and so on), nudge or not: the requests it missed may have no other event to wake
the agent for them. Until the queue answers again, the agent arms its free slots' claims before
it takes, so new work is not held up by the queue's timeouts; the other lanes are still tried
(another lane's reader may answer).

Batch-priority work has lanes of its own (`corral.protocol.priority`): claim subjects
``work.batch.{vendor}.{model}``, armed only for the free slots beyond ``reserve`` (kept for
interactive requests), and a queue lane taken only once the model's interactive lane is empty, up
to those same spare slots. A batch claim that finds no spare slot is answered ``busy``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from corral.agent.slots import SlotTable
from corral.agent.worker import Job
from corral.protocol.names import ANY_VENDOR
from corral.protocol.priority import BATCH
from corral.protocol.subjects import Subjects
from corral.runtime.nats import stream_delivery
from corral.runtime.singleshot import SingleShots
from corral.runtime.workqueue import Puller
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

log = logging.getLogger(__name__)

# after a take the queue did not answer, reconcile again this long after; doubled for each take
# unanswered in a row, up to the most
TAKE_RETRY_S = 1.0
TAKE_RETRY_MAX_S = 16.0

Handler = Callable[[Msg], Awaitable[None]]


class Claims:
    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        vendor: str,
        *,
        on_claim: Handler,
        on_nudge: Handler,
        retry: Callable[[], None] = lambda: None,
        reserve: int = 0,
    ) -> None:
        """``retry``: asks the agent for another `reconcile` (called `TAKE_RETRY_S` after a take
        the queue did not answer)."""
        self._nc = nc
        self.reserve = reserve  # free slots per model batch work leaves to interactive requests
        self._subjects = subjects
        self._vendor = vendor
        self._on_claim = on_claim
        self._on_nudge = on_nudge
        self._retry = _TakeRetry(retry)
        self._reconcile_again = retry
        self._unanswered = False  # the last reconcile's take of some lane went unanswered
        self._puller = Puller(nc, subjects)
        self._shots = SingleShots(nc)
        self._armed: dict[str, list[Subscription]] = {}  # claim subject → armed single-shot subs
        self._nudges: dict[str, Subscription] = {}  # queued-nudge subject → subscription
        self._hint: dict[str, int] = {}  # warm model token → nudges seen (0 = queue known empty)
        # one reconcile at a time, each from the warm set as it is when its turn comes: a reconcile
        # from an older snapshot must never drop the interest a newer one just took
        self._reconciling = asyncio.Lock()

    def subjects_of(self, token: str) -> tuple[str, str]:
        """Where requests for ``token`` are claimed here: unpinned, and pinned to this vendor."""
        return self._subjects.work(ANY_VENDOR, token), self._subjects.work(self._vendor, token)

    def batch_subjects_of(self, token: str) -> tuple[str, str]:
        """Where batch-priority requests for ``token`` are claimed here."""
        return self._subjects.work(ANY_VENDOR, token, BATCH), self._subjects.work(self._vendor, token, BATCH)

    def spare(self, free: int) -> int:
        """Of ``free`` slots, how many batch work may take."""
        return max(free - self.reserve, 0)

    def claim(self, msg: Msg, slots: SlotTable[Job], job: Job) -> bool:
        """Take a slot for ``job``, delivered by ``msg`` on a claim subject: a batch claim only a
        slot to spare (`spare`)."""
        assert job.token is not None
        if msg.subject.split(".", 3)[2] == BATCH and not self.spare(slots.free(job.token)):
            return False
        return slots.claim(job.token, job)

    async def _delivered(self, msg: Msg) -> None:
        """A delivery on a claim subscription: to the agent, unless a JetStream consumer delivered
        it (`corral.runtime.nats.published`): that one is dropped, and the single-shot it used up
        is retired and armed again, or each such delivery would take a slot's claim away."""
        if stream_delivery(msg):
            await self.spent(msg)
            self._reconcile_again()
            return
        await self._on_claim(msg)

    async def spent(self, msg: Msg) -> None:
        """A claim subscription delivered: it is retired (a second delivery, of the race its arming
        leaves, finds it gone already). Found by its subject, or by its id for a delivery whose
        subject is not its subscription's (a JetStream consumer's keeps the stored subject)."""
        subs = self._armed.get(msg.subject)
        if subs is None or all(s._id != msg.sid for s in subs):
            subs = next((b for b in self._armed.values() if any(s._id == msg.sid for s in b)), None)
        if subs is None:
            return
        for i, s in enumerate(subs):
            if s._id == msg.sid:
                del subs[i]  # in place: `arm` may be appending to it
                await self._shots.spent(s)
                return

    def queue_waits(self, token: str) -> bool:
        """Requests for ``token`` may wait in the fleet queue: they go before new work (unless the
        queue is not answering: a freed slot is offered to new work at once then)."""
        return bool(self._hint.get(token)) and not self._unanswered

    def look_at_queues(self) -> None:
        """Requests may wait for every warm model without a nudge having said so (nudges sent
        while this agent was off NATS reached nobody): the next reconcile looks at each queue."""
        for token in self._hint:
            self._hint[token] = self._hint[token] + 1

    def nudged(self, token: str, warm: Collection[str]) -> bool:
        """A request for ``token`` was queued; True when the agent should look at the queue."""
        if token not in warm:
            return False
        self._hint[token] = self._hint.get(token, 0) + 1
        return True

    async def arm(self, subject: str, n: int) -> None:
        """Arm single-shot claim subscriptions on ``subject`` until ``n`` are armed."""
        if n <= len(self._armed.get(subject, ())):
            return
        subs = self._armed.setdefault(subject, [])
        while len(subs) < n:
            subs.append(await self._shots.arm(subject, subject, self._delivered))

    async def arm_free(self, token: str, free: int) -> None:
        for subject in self.subjects_of(token):
            await self.arm(subject, free)
        for subject in self.batch_subjects_of(token):
            await self.arm(subject, self.spare(free))

    async def reconcile(
        self,
        warm: Callable[[], Collection[str]],
        free: Callable[[str], int],
        take: Callable[[str, list[Msg]], Awaitable[None]],
        slow: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        """Hold interest in exactly the free slots of the ``warm()`` models (none while the agent is
        not active: return no models), serving their queued requests first (``take``). The
        ``slow()`` ones (runners partly in system RAM) take queued requests but hold no claim
        subscriptions: a free slot on a card with the model wholly in VRAM gets new work first."""
        async with self._reconciling:
            await self._reconcile(warm(), free, take, slow())

    async def _reconcile(
        self,
        warm: Collection[str],
        free: Callable[[str], int],
        take: Callable[[str, list[Msg]], Awaitable[None]],
        slow: Collection[str],
    ) -> None:
        await self._shots.relimit()  # after a reconnect: the replayed claims fire once again
        await self._sync_nudges(warm)
        fast = [t for t in warm if t not in slow] if slow else warm
        if self._unanswered:  # the queue did not answer the last take: new work first this time
            await self._hold(fast, free)
        self._unanswered = False
        for token in warm:
            await self._take_queued(token, free, take)  # waiting requests first, then new work
        await self._hold(fast, free)

    async def _hold(self, warm: Collection[str], free: Callable[[str], int]) -> None:
        """Hold exactly one armed claim subscription per free slot of the ``warm`` models."""
        want: dict[str, int] = {}
        for token in warm:
            n = max(free(token), 0)
            want.update(dict.fromkeys(self.subjects_of(token), n))
            want.update(dict.fromkeys(self.batch_subjects_of(token), self.spare(n)))
        for subject in set(self._armed) | set(want):
            subs = self._armed.setdefault(subject, [])
            n = want.get(subject, 0)
            # Surplus armed subscriptions of a warm model are left armed: each fires only once,
            # and a surplus delivery finds no free slot and is answered `busy`, so the gateway
            # moves on at once.
            while len(subs) > n and subject not in want:
                await self._shots.retire(subs.pop())
            await self.arm(subject, n)
            if not subs and self._armed.get(subject) is subs:
                del self._armed[subject]

    async def _sync_nudges(self, warm: Collection[str]) -> None:
        """Listen for enqueue nudges of exactly the ``warm`` models."""
        want = set()
        for token in warm:
            want.add(self._subjects.queued(ANY_VENDOR, token))
            want.add(self._subjects.queued(self._vendor, token))
        for subject in set(self._nudges) - want:
            await _unsubscribe(self._nudges.pop(subject))
        for subject in want - set(self._nudges):
            self._nudges[subject] = await self._nc.subscribe(subject, cb=self._on_nudge)
        for token in list(self._hint):
            if token not in warm:
                del self._hint[token]
        for token in warm:
            self._hint.setdefault(token, 1)  # newly warm: requests may be waiting already

    async def _take_queued(
        self, token: str, free: Callable[[str], int], take: Callable[[str, list[Msg]], Awaitable[None]]
    ) -> None:
        """Admit up to the free slots' worth of queued requests for ``token``, oldest first: the
        interactive lanes, then, with slots to spare (`spare`), the batch lanes.

        A pull can admit fewer than it took — expired requests are dropped, malformed ones answered
        ``bad_request`` — so it takes again while slots are free and the queue has more: nothing
        else would wake the agent for the requests behind them."""
        hint = self._hint.get(token, 0)
        if not hint:
            return
        got_all = True
        lanes = [(self._subjects.queue(v, token), False) for v in (self._vendor, ANY_VENDOR)]
        lanes += [(self._subjects.queue(v, token, BATCH), True) for v in (self._vendor, ANY_VENDOR)]
        for subject, batch in lanes:
            drained = False
            while not drained:
                n = self.spare(free(token)) if batch else free(token)
                if n <= 0:
                    return  # more may wait: the hint stays for the next free slot
                msgs, drained = await self._puller.take_batch(subject, n)
                await take(token, msgs)
                if msgs or drained:
                    self._retry.answered()
                else:
                    # the queue did not say (an error, logged; JetStream electing a leader, say):
                    # the hint stays, and the agent looks again by itself
                    self._unanswered = True
                    self._retry.later()
                    break
            got_all = got_all and drained
        if got_all and self._hint.get(token) == hint:
            self._hint[token] = 0  # every lane ran dry and no nudge came meanwhile

    async def drop(self) -> None:
        """Take back all interest (on drain). A claim on its way meanwhile is still delivered, and
        answered ``busy`` (the agent is no longer active), so its sender moves on at once."""
        self._retry.cancel()
        for sub in self._nudges.values():
            await _unsubscribe(sub)
        self._nudges.clear()
        for subs in self._armed.values():
            for s in subs:
                await self._shots.retire(s)
        self._armed.clear()
        await self._shots.settled()


class _TakeRetry:
    """When to reconcile again after takes the queue did not answer: `TAKE_RETRY_S` after the
    first, doubling up to `TAKE_RETRY_MAX_S` while none answers."""

    def __init__(self, retry: Callable[[], None]) -> None:
        self._retry = retry
        self._timer: asyncio.TimerHandle | None = None
        self._delay_s = TAKE_RETRY_S

    def later(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer.when() > loop.time():
            return  # one is due already (another lane of this reconcile went unanswered too)
        self._timer = loop.call_later(self._delay_s, self._retry)
        self._delay_s = min(self._delay_s * 2, TAKE_RETRY_MAX_S)

    def answered(self) -> None:
        self._delay_s = TAKE_RETRY_S

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _unsubscribe(sub: Subscription) -> None:
    """Unsubscribe; one already gone (retired after its delivery, or the connection closed) is
    gone either way."""
    try:
        await sub.unsubscribe()
    except NatsError as e:
        log.debug("unsubscribe %s: %s", sub.subject, e)
