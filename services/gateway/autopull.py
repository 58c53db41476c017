"""Auto-pull: a request for a model no agent has first pulls it onto one agent (through the
registry, or where the registry would put it when none runs), then is routed as usual. One pull per
model however many requests ask; a pull that failed answers the same model's requests for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
from corral.gateway.settings import GatewaySettings
from corral.protocol.errors import BadRequest, CorralError
from corral.protocol.names import ModelName, host_allowed, registry_refused
from corral.routing import pull_order
from corral.runtime.fleet import FleetView
from corral.runtime.tasks import cancel_and_wait
from corral.transport import ReplyStream, Transport, WorkRequest, send_resending

log = logging.getLogger(__name__)

PULL_FAILURE_MEMORY_S = 10.0  # an auto-pull that failed answers the same model's requests this long

_enc = msgspec.json.Encoder()


class AutoPuller:
    def __init__(self, transport: Transport, fleet: FleetView, settings: GatewaySettings) -> None:
        self._transport = transport
        self._fleet = fleet
        self._settings = settings
        self._pulls: dict[tuple[str, str | None], asyncio.Future[bool]] = {}  # pulls under way

    async def stop(self) -> None:
        await cancel_and_wait(list(self._pulls.values()))

    async def pull(self, req: WorkRequest) -> bool:
        """Pull ``req``'s model onto one agent (of the pinned vendor, when strict) and wait until the
        fleet shows it there; False when it could not be pulled. Concurrent requests for one model
        share one pull. A model from a registry not in ``allowed_registries`` is a `BadRequest`."""
        assert req.model is not None
        if not host_allowed(req.model.host, self._settings.allowed_registries):
            raise BadRequest(registry_refused(req.model.host))
        key = (req.model.key, req.vendor if req.strict else None)
        pull = self._pulls.get(key)
        if pull is None:
            pull = asyncio.ensure_future(self._pull(req.model, key[1]))
            self._pulls[key] = pull

            def forget(done: asyncio.Future[bool]) -> None:
                # a failed pull answers the requests after it for a while (no pull per request
                # for a model that does not exist); a successful one is done with
                delay = 0.0 if done.cancelled() or done.result() else PULL_FAILURE_MEMORY_S
                asyncio.get_running_loop().call_later(delay, lambda: self._pulls.pop(key, None))

            pull.add_done_callback(forget)
        return await asyncio.shield(pull)

    async def _pull(self, model: ModelName, vendor: str | None) -> bool:
        log.info("no agent has %s: pulling it", model.display)
        body = _enc.encode({"model": model.display, "stream": False, "replicas": 1, "vendor": vendor})
        transport, settings = self._transport, self._settings
        try:
            reply: ReplyStream | None = await send_resending(
                transport,
                transport.subjects.registry("pull"),
                WorkRequest("/api/pull", body),
                timeout=settings.claim_timeout_s,
            )
            if reply is None:  # no registry: the agent the registry would have chosen
                agents = pull_order(self._fleet.agents(), model.key, vendor)
                if not agents:
                    return False
                reply = await transport.send_to(
                    agents[0].id, WorkRequest("/api/pull", body), timeout=settings.queue_timeout_s
                )
            async with reply:
                data = await reply.read()
        except (CorralError, nats.errors.Error) as e:  # NATS going away under a stopping gateway
            log.warning("pulling %s failed: %s", model.display, e)
            return False
        if reply.status != 200:
            log.warning("pulling %s failed: %s", model.display, data.decode(errors="replace")[:300])
            return False
        # the agent re-reads its Ollama after a pull and publishes its state: wait for that
        deadline = time.monotonic() + settings.claim_timeout_s + settings.idle_timeout_s
        while not any(vendor in (None, a.vendor) for a in self._fleet.with_model(model.key)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self._fleet.wait_changed(remaining)
        return True
