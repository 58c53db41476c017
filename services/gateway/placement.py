"""Cold loads seen from one gateway: which load is under way where, and the registry's word on
where the next one goes.

The registry arbitrates fleet-wide (a KV marker per model and context, see
`corral.registry.placement`); with no registry running, this gateway's own markers keep it to one
load per model and context at a time here. A marker counts for ``load_grace_s`` after the send,
before the agent's published state shows the load (that state follows the send by a publish).
Each new marker first drops those that have done their work (`corral.routing.marker_expired`:
load done, failed, or older than `LOAD_MARKER_TTL_S`), so the map holds the loads under way, not
every model and context ever asked for.
"""

from __future__ import annotations

import logging
import time

import msgspec
import nats.errors
from corral.protocol.messages import AgentState, PlaceRequest, place_reply_decoder
from corral.protocol.subjects import Subjects
from corral.routing import LOAD_MARKER_TTL_S, Route, as_placed, loading_for, marker_expired, warm
from corral.runtime.fleet import FleetView
from corral.transport import WorkRequest
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()


def place_request(
    req: WorkRequest, route: Route, proposal: str, exclude: tuple[str, ...] = ()
) -> PlaceRequest:
    """The registry's placement question (``place``, or ``unplace`` for a failed load) for ``req``."""
    assert req.model is not None
    return PlaceRequest(
        model=route.key,
        token=req.model.token,
        vendor=req.vendor,
        strict=req.strict,
        num_ctx=route.num_ctx,
        proposal=proposal,
        exclude=exclude,
    )


class Loads:
    """The loads this gateway started or was told of, by (model key, num_ctx or 0)."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        fleet: FleetView,
        *,
        grace_s: float,
        ttl_s: float = LOAD_MARKER_TTL_S,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._fleet = fleet
        self._grace_s = grace_s
        self._ttl_s = ttl_s
        self._started: dict[tuple[str, int], tuple[str, float]] = {}  # → (agent, monotonic since)
        # (model key, num_ctx or 0, agent) → monotonic time its load there failed
        self._failed: dict[tuple[str, int, str], float] = {}

    def loading_at(self, route: Route, a: AgentState) -> bool:
        """A load for ``route`` is under way at ``a``: its state says so (unless that load failed
        moments ago, `failed_lately`), or this gateway sent one there moments ago (agent state lags
        the send by up to its publish interval)."""
        key = (route.key, route.num_ctx or 0)
        if loading_for(route, a) and not self.failed_lately(route, a):
            return True
        marker = self._started.get(key)
        if marker is None or marker[0] != a.id:
            return False
        return time.monotonic() - marker[1] < self._grace_s and not warm(route, a)

    def failed_lately(self, route: Route, a: AgentState) -> bool:
        """A load of ``route`` at ``a`` failed (its reply said so) within ``load_grace_s``. The
        agent's state saying the load is over travels by a KV write and a watch, and may reach this
        gateway after the error reply did, even after a state published before the failure: for
        that long, a state showing the load under way is not believed."""
        when = self._failed.get((route.key, route.num_ctx or 0, a.id))
        return when is not None and time.monotonic() - when < self._grace_s

    def as_placed(self, agents: list[AgentState]) -> list[AgentState]:
        """``agents`` with the loads this gateway sent them within ``load_grace_s`` counted as under
        way where their states do not show them yet (`corral.routing.as_placed`): the next cold
        load, of this model or another, sees that memory taken."""
        now = time.monotonic()
        placed: dict[str, list[Route]] = {}
        for (key, ctx), (agent_id, since) in self._started.items():
            if now - since < self._grace_s:
                placed.setdefault(agent_id, []).append(Route(key=key, num_ctx=ctx or None))
        return as_placed(agents, placed) if placed else agents

    def under_way(self, route: Route, agents: list[AgentState]) -> bool:
        return any(self.loading_at(route, a) for a in agents)

    async def place(
        self, req: WorkRequest, route: Route, proposal: AgentState, failed: set[str]
    ) -> tuple[AgentState | None, bool]:
        """Where ``route``'s model loads, and whether this request is the one to load it there."""
        ask = place_request(req, route, proposal.id, exclude=tuple(sorted(failed)))
        agent_id, mine = proposal.id, True
        try:
            msg = await self._nc.request(self._subjects.registry("place"), _enc.encode(ask), timeout=2.0)
            answer = place_reply_decoder.decode(msg.data)
            if answer.agent:
                agent_id, mine = answer.agent, answer.mine
        except (nats.errors.Error, msgspec.DecodeError) as e:  # no registry (or it is slow): decide here
            log.debug("placing %s locally: %s", route.key, e)
            marker = self._started.get((route.key, route.num_ctx or 0))
            at = self._fleet.get(marker[0]) if marker is not None else None
            if at is not None and at.id not in failed and self.loading_at(route, at):
                agent_id, mine = at.id, False
        if mine:
            self.prune()
            self._started[(route.key, route.num_ctx or 0)] = (agent_id, time.monotonic())
        return self._fleet.get(agent_id), mine

    def prune(self) -> None:
        """Forget the markers that have done their work (`marker_expired`), and the failures
        older than ``load_grace_s``."""
        now = time.monotonic()
        for failure, when in list(self._failed.items()):
            if now - when >= self._grace_s:
                del self._failed[failure]
        for (key, ctx), (agent_id, since) in list(self._started.items()):
            agent = self._fleet.get(agent_id)
            if marker_expired(
                Route(key=key, num_ctx=ctx or None),
                agent,
                alive=agent is not None and self._fleet.alive(agent),
                age_s=now - since,
                grace_s=self._grace_s,
                ttl_s=self._ttl_s,
            ):
                del self._started[(key, ctx)]

    @property
    def marked(self) -> int:
        """How many markers this gateway keeps."""
        return len(self._started)

    async def unplace(self, req: WorkRequest, route: Route, agent: AgentState, *, failed: bool) -> None:
        """Forget the load this gateway was given at ``agent`` here and at the registry: it never
        started there (no answer, or ``busy``), or it ``failed`` (an error answered it), and then
        that agent's state showing it loading is not believed for a while (`failed_lately`)."""
        key = (route.key, route.num_ctx or 0)
        if failed:
            self.prune()  # keeps the failures to those of the last ``load_grace_s``
            self._failed[(*key, agent.id)] = time.monotonic()
        marker = self._started.get(key)
        if marker is not None and marker[0] == agent.id:
            del self._started[key]
        ask = place_request(req, route, agent.id)
        try:  # answered, so the next placement cannot overtake it; no registry answers at once
            await self._nc.request(self._subjects.registry("unplace"), _enc.encode(ask), timeout=1.0)
        except nats.errors.Error as e:
            log.debug("no registry to unplace %s at %s: %s", route.key, agent.id, e)
