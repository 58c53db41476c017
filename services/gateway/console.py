"""The web console at ``/console``: static files shipped in the package (`STATIC`, no build step),
and the few admin calls over HTTP that it needs besides Ollama's own API.

- ``GET /api/corral/whoami``: whether API keys are on, and the calling key's name and role, so the
  page can grey out what a user key may not do (the gateway refuses it all the same).
- ``POST /api/corral/agents/{id}/drain|cordon|uncordon``: what ``corral drain`` does over NATS
  (`corral.protocol.subjects.Subjects.agent_admin`), answered once the agent has taken it.
- ``POST /api/corral/unload`` with ``{"model": ...}``: every agent that has the model loaded lets it
  go, as Ollama's ``keep_alive: 0`` does (`corral.gateway.management.unload_everywhere`, which
  that call uses too), answered with which agents did and which failed. Both are admin calls: a
  user key's ``keep_alive: 0`` is refused (403), since it would end other users' warm runners.

Everything under ``/api/corral/`` but ``whoami`` needs an admin key when keys are on
(`corral.gateway.access.user_may`). The pages themselves are open (`corral.gateway.access.is_open`):
they hold no data, and the page asks for a key before it reads any.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import nats.errors
from corral.gateway import management
from corral.gateway.auth import key_of
from corral.gateway.errors import JSON, TOO_DEEP, json_error
from corral.protocol import headers as H
from corral.protocol.errors import CorralError
from corral.protocol.names import parse_name
from corral.runtime.nats import denied
from corral.transport import WorkRequest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

if TYPE_CHECKING:
    from corral.gateway.app import Gateway

log = logging.getLogger(__name__)

# index.html, app.js, charts.js, style.css; a name no import can mean (unlike a "console" folder
# beside this module, which Python and setuptools would take for a package)
STATIC: Final = Path(__file__).with_name("console-static")
PREFIX: Final = "/console"
ACTIONS: Final = {H.DRAIN: "draining", H.CORDON: "cordoned", H.UNCORDON: "active"}
CONTROL_TIMEOUT_S: Final = 5.0  # how long an agent may take to acknowledge a drain
UNLOAD_TIMEOUT_S: Final = 30.0  # how long an agent may take to let a model go

_enc = msgspec.json.Encoder()


class _Unload(msgspec.Struct):
    model: str


def _json(obj: object, status: int = 200) -> Response:
    return Response(_enc.encode(obj), status_code=status, media_type=JSON)


def mount(app: FastAPI, gw: Gateway) -> None:
    """Add the console's pages and calls to the gateway's app."""
    app.include_router(router(gw))

    @app.get(PREFIX, include_in_schema=False)
    async def console_root() -> Response:
        return RedirectResponse(PREFIX + "/", status_code=307)

    app.mount(PREFIX, StaticFiles(directory=STATIC, html=True), name="console")


def router(gw: Gateway) -> APIRouter:
    r = APIRouter(prefix="/api/corral")

    @r.get("/whoami")
    async def whoami(request: Request) -> Response:
        key = key_of(request.scope)
        if key is None:  # keys off: everyone may do everything
            return _json({"auth": "off", "name": None, "role": "admin"})
        return _json({"auth": "keys", "name": key.name, "role": key.role})

    @r.post("/agents/{agent}/{action}")
    async def control(agent: str, action: str) -> Response:
        if action not in ACTIONS:
            return json_error(404, f"unknown action {action!r}; use drain, cordon or uncordon")
        if gw.fleet.get(agent) is None:
            return json_error(404, f"no agent {agent!r} in the fleet")
        assert gw.nc is not None
        try:
            subject = gw.subjects.agent_admin(agent)
        except ValueError as e:  # an id that cannot be a subject token cannot be in the fleet
            return json_error(400, str(e))
        try:
            await gw.nc.request(subject, b"", headers={H.CTL: action}, timeout=CONTROL_TIMEOUT_S)
        except nats.errors.Error as e:  # a timeout, no responders, or a permissions violation
            if (why := denied(subject)) is not None:  # NATS identities: only the operator may
                log.warning("%s of agent %s denied: %s", action, agent, why)
                return json_error(
                    403,
                    f"this gateway's NATS identity may not {action} agents ({why}); "
                    f"use `corral {action} {agent}` with the operator's identity",
                )
            log.warning("%s of agent %s got no answer: %s", action, agent, e)
            return json_error(504, f"agent {agent} did not answer the {action}: {e}")
        log.info("agent %s: %s (through the console's HTTP call)", agent, action)
        return _json({"agent": agent, "status": ACTIONS[action]})

    @r.post("/unload")
    async def unload(request: Request) -> Response:
        try:
            raw = msgspec.json.decode(await request.body(), type=_Unload).model
            model = parse_name(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return json_error(400, f"invalid request body: {e}")
        except RecursionError:
            return json_error(400, TOO_DEEP)
        except CorralError as e:
            return json_error(e.status, e.message)
        body = _enc.encode({"model": model.display, "keep_alive": 0})
        work = WorkRequest(endpoint="/api/generate", body=body, model=model)
        answers = await management.unload_everywhere(gw.planner, work, timeout=UNLOAD_TIMEOUT_S)
        if not answers:
            return json_error(404, f"model '{raw}' is not loaded on any agent")
        done: list[str] = []
        failed: dict[str, str] = {}
        for agent, answer in answers.items():
            if isinstance(answer, Exception):
                failed[agent] = str(answer)
            elif answer[0] != 200:
                failed[agent] = f"status {answer[0]}"
            else:
                done.append(agent)
        status = 200 if done else 502
        return _json({"model": model.display, "unloaded": done, "failed": failed}, status)

    return r
