"""Model management, routed by who has what: show, push, pull, create, blobs, delete, copy, and
unloads (``keep_alive: 0`` with nothing to run). Fan-outs go to every agent holding the model at
once (`corral.transport.fan_out`), each reply closed however its read ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import msgspec
from corral.gateway.asgi import Receive, Send
from corral.gateway.edge import STREAM, ClientBody
from corral.gateway.errors import JSON, TOO_DEEP, json_error, native_body
from corral.gateway.metrics import DIRECT, Decision
from corral.gateway.outage import MESSAGE as OUTAGE_MESSAGE
from corral.gateway.planner import Planner
from corral.gateway.relay import RelayResponse, ReplyResponse, relay, respond, respond_error
from corral.gateway.shutdown import MESSAGE as STOP_MESSAGE
from corral.protocol.errors import (
    BadRequest,
    CorralError,
    InvalidModelName,
    ModelNotFound,
    NoCapacity,
    not_found_message,
)
from corral.protocol.gojson import as_go_reads, first_value, fold_keys, kind, syntax_message
from corral.protocol.names import (
    VENDORS,
    ModelName,
    host_allowed,
    parse_name,
    registry_refused,
    split_vendor_pin,
)
from corral.routing import pull_order
from corral.transport import Reply, WorkRequest, fan_out, send_resending
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

log = logging.getLogger(__name__)

REPLICAS_HEADER = "X-Corral-Replicas"  # /api/pull: on how many agents (a number or "all")
VENDOR_HEADER = "X-Corral-Vendor"  # /api/pull: only agents of this vendor
NDJSON = "application/x-ndjson"
SUCCESS_LINE = b'{"status":"success"}\n'


async def _whole(reply: Reply) -> tuple[int, bytes, str]:
    return reply.status, await reply.read(), reply.content_type


async def unload_everywhere(
    planner: Planner, work: WorkRequest, *, timeout: float | None = None
) -> dict[str, tuple[int, bytes, str] | Exception]:
    """Tell every agent that has ``work``'s model loaded to let it go, all at once: agent → its
    answer (status, body, content type) or the error it failed with. Empty when no agent has it
    loaded. A vendor pin (``amd/llama3.2``) narrows it to that vendor's agents, as it steers a
    request there: when none of them has it loaded, a preference unloads it everywhere (where the
    pinned name's requests went), a strict pin nowhere."""
    assert work.model is not None
    work.unload = True
    holders = planner.fleet.loaded_on(work.model.key)
    if work.vendor is not None:
        pinned = [a for a in holders if a.vendor == work.vendor]
        if pinned or work.strict:
            holders = pinned
    loaded = [a.id for a in holders]
    if not loaded:
        return {}
    answers = await fan_out(loaded, lambda agent: planner.send_to(agent, work, timeout=timeout), _whole)
    return dict(zip(loaded, answers, strict=True))


def unload_answerer(planner: Planner, work: WorkRequest) -> str | None:
    """When no agent has the model loaded: one with it on disk, to answer the unload as Ollama does
    (of the pinned vendor first; for a strict pin no other, where the model may be loaded)."""
    assert work.model is not None
    holders = [
        a for a in planner.fleet.with_model(work.model.key) if not work.strict or a.vendor == work.vendor
    ]
    holders.sort(key=lambda a: a.vendor != work.vendor)
    return holders[0].id if holders else None


async def unload(planner: Planner, work: WorkRequest, raw: str, receive: Receive, send: Send) -> None:
    """``keep_alive: 0`` with nothing to run: every agent holding the model must let it go."""
    assert work.model is not None
    key = work.model.key
    answers = await unload_everywhere(planner, work)
    if not answers:
        answerer = unload_answerer(planner, work)
        if answerer is None:
            await respond_error(send, ModelNotFound(key), api="ollama", endpoint=work.endpoint, raw_model=raw)
            return
        await relay(planner, work, receive, send, raw_model=raw, target=answerer)
        return
    first: tuple[str, tuple[int, bytes, str]] | None = None  # the agent whose answer is given
    for agent, r in answers.items():
        if isinstance(r, Exception):
            log.warning("unload on one agent failed: %s", r)
        elif first is None or (first[1][0] != 200 and r[0] == 200):
            first = agent, r
    if first is None:
        await respond_error(send, ModelNotFound(key), api="ollama", endpoint=work.endpoint, raw_model=raw)
        return
    agent, (status, body, content_type) = first
    said = Decision(started=0.0, route=DIRECT, served=work.model.display).headers(agent)
    await respond(send, status, body, content_type, said)


def error(err: CorralError) -> Response:
    return json_error(err.status, err.message)


# the Go struct Ollama decodes each of these bodies into, named in its decoding errors, and its
# typed fields besides the model's name (api/types.go)
_GO_STRUCT = {
    "/api/show": "ShowRequest",
    "/api/pull": "PullRequest",
    "/api/push": "PushRequest",
    "/api/copy": "CopyRequest",
    "/api/delete": "DeleteRequest",
}
_GO_FIELDS: dict[str, dict[str, type]] = {
    "/api/show": {"verbose": bool},
    "/api/pull": {"stream": bool, "insecure": bool},
    "/api/push": {"stream": bool, "insecure": bool},
    "/api/copy": {"destination": str},
}
_GO_TYPE = {bool: "bool", str: "string"}


class Named(NamedTuple):
    body: bytes  # as Ollama reads it (with a vendor pin: without it)
    fields: dict[str, Any]
    raw: str  # the name as the client spelt it (less a vendor pin)
    model: ModelName
    vendor: str | None = None  # the vendor a pinned name asked for (``amd/llama3``, ``llama3@amd``)


async def _name(request: Request, field: str = "model", *, empty: bool = False, pins: bool = False) -> Named:
    """The body, its fields and the model it names (``field``, or Ollama's alias ``name``). No name is
    ``model is required``, or with ``empty`` an invalid (empty) name, as copy and delete say. A
    body Go could not decode gets the error Go's encoding/json gives (`corral.protocol.gojson`).
    With ``pins``, a vendor pin in the name is read as in a model call, and taken out of the body:
    ``ollama run amd/llama3.2`` shows the model before it runs it (and pulls it on a 404)."""
    body = await request.body()
    if not body or body.isspace():  # no copy of a large body
        raise BadRequest("missing request body")
    path = request.url.path.rstrip("/")
    struct = _GO_STRUCT.get(path, "ShowRequest")
    try:
        obj, read = _decode(body)
    except msgspec.DecodeError as e:
        raise BadRequest(syntax_message(str(e), body)) from None
    except RecursionError:
        raise BadRequest(TOO_DEEP) from None
    if obj is None:
        obj = {}  # Go leaves a struct as it was for `null`: no name
    if not isinstance(obj, dict):
        raise BadRequest(f"json: cannot unmarshal {kind(obj)} into Go value of type api.{struct}")
    # the name's field, with `model`'s older spelling `name`, then the struct's other typed fields
    names: dict[str, type] = {field: str, "name": str} if field == "model" else {field: str}
    typed = names | _GO_FIELDS.get(path, {})
    folded = fold_keys(obj, typed)  # ``"Model"``: Go reads it as ``model``
    if folded is not None or read is not body:  # so is what follows the JSON value left unread
        obj = folded or obj
        body = msgspec.json.encode(obj)  # the body as Ollama reads it
    for key, wanted in typed.items():
        value = obj.get(key)
        if value is not None and not isinstance(value, wanted):
            raise BadRequest(
                f"json: cannot unmarshal {kind(value)} into Go struct field {struct}.{key} "
                f"of type {_GO_TYPE[wanted]}"
            )
    raw = obj.get(field) or (obj.get("name") if field == "model" else None) or ""
    if not raw and empty:
        raise InvalidModelName("")
    if not raw:
        raise BadRequest("model is required")
    vendor, name = split_vendor_pin(raw) if pins else (None, raw)
    if vendor is not None:
        obj = {**obj, "model" if obj.get(field) else "name": name}
        body = msgspec.json.encode(obj)
    return Named(body, obj, name, parse_name(name), vendor)


def _decode(body: bytes) -> tuple[Any, bytes]:
    """``body`` as JSON, and the bytes read so; where the strict decoder refuses it, as Go reads it
    (invalid UTF-8 and lone surrogates as U+FFFD: ``body`` itself, which Ollama reads alike; what
    follows its JSON value left unread: the value alone), else the strict decoder's error."""
    try:
        return msgspec.json.decode(body), body
    except msgspec.DecodeError as e:
        fixed = as_go_reads(body)
        if fixed != body:
            with contextlib.suppress(msgspec.DecodeError):
                return msgspec.json.decode(fixed), body
        first = first_value(fixed)
        if first is not None:
            with contextlib.suppress(msgspec.DecodeError):
                return msgspec.json.decode(first), first
        raise e from None


async def to_holder(
    planner: Planner,
    request: Request,
    endpoint: str,
    *,
    hidden: Callable[[Mapping[str, Any], str], bool] | None = None,
) -> Response:
    """Show and push go to the least busy agent that has the model (of a vendor pin's vendor
    first), else to the one heard last of those gone silent lately (`FleetView.lately_silent_with`:
    it may only be slow, and a 404 would make ``ollama run`` pull the model again); a model
    ``hidden`` from the request's API key (`corral.gateway.auth.hides`) answers as if no agent had
    it. A show of an alias shows its target: ``ollama run ALIAS`` shows the model first."""
    try:
        body, fields, raw, model, vendor = await _name(request, pins=True)
    except CorralError as e:
        return error(e)
    fleet = planner.fleet
    hide = hidden is not None and hidden(request.scope, model.display)
    rules = planner.policy.policy if planner.policy is not None else None
    shown = model  # what answers: the model named, or the target of the alias it names
    if endpoint == "/api/show" and rules is not None and (target := rules.aliases.get(model.key)):
        shown, body = parse_name(target), msgspec.json.encode({**fields, "model": target, "name": target})
    holders = sorted(fleet.with_model(shown.key), key=lambda a: (a.vendor != vendor, a.in_flight))
    if not holders:
        holders = sorted(fleet.lately_silent_with(shown.key), key=lambda a: -(fleet.heard(a.id) or 0.0))
    if not holders or hide:
        msg = not_found_message(endpoint, raw, model.display)
        return Response(native_body(msg), status_code=404, media_type=JSON)
    return RelayResponse(planner, WorkRequest(endpoint=endpoint, body=body, model=None), holders[0].id)


async def to_first(planner: Planner, request: Request, endpoint: str) -> Response:
    """Blobs and creates go to one agent, the same one each time, so a create finds its blobs. A
    blob upload's body the edge left unread (`corral.gateway.edge.ClientBody`) is streamed to that
    agent as it asks for it, never held whole here."""
    stream: ClientBody | None = request.scope.get(STREAM)
    body = b"" if stream is not None else await request.body()
    agents = sorted(a.id for a in planner.fleet.agents() if a.status == "active")
    if not agents:
        return error(ModelNotFound("no agents in the fleet"))
    work = WorkRequest(endpoint=endpoint, body=body, method=request.method, stream=stream)
    return RelayResponse(planner, work, agents[0])


async def create(planner: Planner, request: Request) -> Response:
    """A create from a model the fleet has (``from`` naming it, no ``files`` or ``adapters``) runs on
    every agent that has that model, so the new model is wherever its base is and requests for it
    spread as its base's do: one success is the answer. Streamed, the client sees the first
    holder's progress (`_create_streamed`). A create that names uploaded blobs goes where they went
    (`to_first`)."""
    body = await request.body()
    try:
        fields = msgspec.json.decode(body)
    except msgspec.DecodeError:
        fields = None  # Ollama words the error
    except RecursionError:
        return error(BadRequest(TOO_DEEP))
    made = fields.get("model") or fields.get("name") if isinstance(fields, dict) else None
    if (refused := pin_named(made)) is not None:
        return refused
    base = fields.get("from") if isinstance(fields, dict) else None
    if not isinstance(base, str) or fields.get("files") or fields.get("adapters"):
        return await to_first(planner, request, "/api/create")  # blobs, or no base to go by
    try:
        holders = [a.id for a in planner.fleet.with_model(parse_name(base).key)]
    except InvalidModelName:
        holders = []  # Ollama words the error
    if not holders:
        return await to_first(planner, request, "/api/create")
    if fields.get("stream") is not False and _valid_name(fields.get("model") or fields.get("name")):
        return StreamingResponse(_create_streamed(planner, holders, fields), media_type=NDJSON)
    # unstreamed, or refused before any progress (a 400 from Ollama, not a stream's error line)
    work = WorkRequest(endpoint="/api/create", body=msgspec.json.encode({**fields, "stream": False}))
    return await _on_every(planner, holders, work)


def pin_named(name: object) -> Response | None:
    """A 400 for a model to be made (a copy's destination, a create's name) whose first segment is a
    vendor (``nvidia/bar``): made so, every later request for it would read a vendor pin and find
    no model ``bar``. With its host (``registry.ollama.ai/nvidia/bar``) it is made and reached."""
    vendor, rest = split_vendor_pin(name) if isinstance(name, str) else (None, "")
    if vendor is None or not str(name).lower().startswith(vendor + "/"):
        return None  # (``bar@amd`` is no name Ollama makes: it says so itself)
    return error(
        BadRequest(
            f'"{name}" would be read as a vendor pin here ({vendor}: model "{rest}"); name it '
            f'registry.ollama.ai/{name} to make a model in the "{vendor}" namespace'
        )
    )


def _valid_name(raw: object) -> bool:
    if not isinstance(raw, str) or not raw:
        return False
    try:
        parse_name(raw)
    except InvalidModelName:
        return False
    return True


async def _create_streamed(
    planner: Planner, holders: list[str], fields: Mapping[str, Any]
) -> AsyncIterator[bytes]:
    """A streamed create on every holder at once: the first holder's progress lines as they come
    (its statuses; a quantisation's ``completed`` of ``total``), then one last line once every holder
    has answered: ``{"status": "success"}`` when one succeeded, else the first failure's error."""
    lead = holders[0]
    progress: asyncio.Queue[bytes | None] = asyncio.Queue()

    def open_reply(agent: str) -> Awaitable[Reply]:
        body = msgspec.json.encode({**fields, "stream": agent == lead})
        return planner.send_to(agent, WorkRequest(endpoint="/api/create", body=body))

    async def read(reply: Reply) -> tuple[int, bytes, str]:
        if reply.agent != lead or reply.status != 200:
            return await _whole(reply)
        last = b""  # held back: the success or the error, said once every holder has answered
        async for line in reply.lines():
            if last:
                progress.put_nowait(last + b"\n")
            last = line
        return reply.status, last, reply.content_type

    async def everywhere() -> bytes:
        """The last line: the creates' summary, logged here whether the client stayed or not."""
        try:
            results: list[Any] = await fan_out(holders, open_reply, read)
        except CorralError as e:
            results = [e] * len(holders)
        finally:
            progress.put_nowait(None)
        failures: list[str] = []
        for agent, r in zip(holders, results, strict=True):
            why = (
                (r.message if isinstance(r, CorralError) else str(r))
                if isinstance(r, Exception)
                else _failure(r)
            )
            if why is not None:
                log.warning("/api/create on agent %s failed: %s", agent, why[:200])
                failures.append(why)
        return SUCCESS_LINE if len(failures) < len(holders) else native_body(failures[0]) + b"\n"

    task = asyncio.create_task(everywhere())
    closing = planner.shutdown.closing  # the gateway's grace runs out: it ends in words, not cut
    try:
        while True:
            nxt: asyncio.Future[bytes | None] = asyncio.ensure_future(progress.get())
            await asyncio.wait((nxt, closing), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                yield native_body(STOP_MESSAGE) + b"\n"
                return
            if (line := nxt.result()) is None:
                break
            yield line
        yield await task
    finally:
        if not task.done():  # the client or the gateway left: the creates still finish alike
            planner.outlive_client(task)


def _failure(answer: tuple[int, bytes, str]) -> str | None:
    """None for a create's success (an unstreamed answer, or a stream's last line), else its error."""
    status, body, _ = answer
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        obj = None
    if status == 200 and isinstance(obj, dict) and obj.get("status") == "success":
        return None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return f"/api/create failed with status {status}"


async def pull(planner: Planner, request: Request) -> Response:
    """Through the registry (replicas, vendor, merged progress) when one runs, else to one agent.

    ``X-Corral-Replicas: N`` (or ``all``) and ``X-Corral-Vendor: amd`` choose where the model
    goes; a plain Ollama client gets one copy, on the agent with the fewest models.
    """
    try:
        # invalid UTF-8 read as Go reads it; no name is an invalid one, as Ollama's pull says
        body, fields, raw, model, pinned = await _name(request, empty=True, pins=True)
        replicas = request.headers.get(REPLICAS_HEADER, "1").strip().lower()
        vendor = request.headers.get(VENDOR_HEADER, "").strip().lower() or pinned
        if replicas != "all" and not (replicas.isascii() and replicas.isdigit() and int(replicas) > 0):
            raise BadRequest(f"{REPLICAS_HEADER} must be a positive number or 'all'")
        if vendor is not None and vendor not in VENDORS:
            raise BadRequest(f"{VENDOR_HEADER} must be one of {', '.join(VENDORS)}")
        allowed = planner.settings.allowed_registries
        if not host_allowed(model.host, allowed):
            raise BadRequest(registry_refused(model.host))
    except CorralError as e:
        return error(e)
    order = {
        **fields,
        "model": raw,
        "replicas": 1 if replicas == "all" else int(replicas),
        "all": replicas == "all",
        "vendor": vendor,
    }
    work = WorkRequest(endpoint="/api/pull", body=msgspec.json.encode(order))
    transport = planner.transport
    if (cut_off := _cut_off(planner)) is not None:
        return cut_off
    try:
        # a registry copy that stops under it hands it on to another (`send_resending`)
        reply = await send_resending(
            transport, transport.subjects.registry("pull"), work, timeout=planner.settings.claim_timeout_s
        )
    except CorralError as e:  # the registry took it and went silent
        return error(e)
    if reply is not None:
        return ReplyResponse(reply, planner.shutdown)
    several = int(replicas) > 1 if replicas != "all" else len(planner.fleet.agents()) > 1
    if several:  # more than one copy: the registry's fan-out, not one agent said to be all
        return error(NoCapacity(f"no registry is running: a pull onto {replicas} agents needs one"))
    # no registry running: the one agent the registry would have chosen first
    agents = pull_order(planner.fleet.agents(), model.key, vendor)
    if not agents:
        return error(CorralError("no agents in the fleet"))
    return RelayResponse(planner, WorkRequest(endpoint="/api/pull", body=body), agents[0].id)


async def to_all_holders(planner: Planner, request: Request, endpoint: str, method: str) -> Response:
    """Delete and copy run on every agent that has the model; one success is the answer."""
    field = "source" if endpoint == "/api/copy" else "model"
    try:
        body, fields, raw, model, _ = await _name(request, field, empty=True)
    except InvalidModelName as e:
        what = "source" if endpoint == "/api/copy" else "name"
        return error(BadRequest(f'{what} "{e.name}" is invalid'))
    except CorralError as e:
        return error(e)
    if endpoint == "/api/copy" and (refused := pin_named(fields.get("destination"))) is not None:
        return refused
    holders = [a.id for a in planner.fleet.with_model(model.key)]
    if not holders:
        text = f"model '{raw}' not found" if endpoint == "/api/delete" else f'model "{raw}" not found'
        return Response(native_body(text), status_code=404, media_type=JSON)
    if (cut_off := _cut_off(planner)) is not None:
        return cut_off
    return await _on_every(planner, holders, WorkRequest(endpoint=endpoint, body=body, method=method))


def _cut_off(planner: Planner) -> Response | None:
    """While this gateway is cut off from NATS, a fleet-wide change can reach no agent nor registry:
    ``503`` saying so at once (as a model request says it after `CORRAL_NATS_OUTAGE_S`), not a
    claim timeout's ``502 no answer``."""
    t = planner.transport
    if t.nc.is_connected:
        return None
    away = planner.outage.away_s(False, time.monotonic(), t.epoch()) or 0.0
    return error(NoCapacity(OUTAGE_MESSAGE.format(away)))


async def _on_every(planner: Planner, agents: list[str], work: WorkRequest) -> Response:
    """Run ``work`` on every one of ``agents`` at once; one success is the answer (the others'
    failures logged), else the first failure."""
    results: list[tuple[int, bytes, str]] = []
    for agent, r in zip(
        agents, await fan_out(agents, lambda a: planner.send_to(a, work), _whole), strict=True
    ):
        if not isinstance(r, Exception):
            results.append(r)
        if isinstance(r, Exception) or r[0] != 200:
            why = r if isinstance(r, Exception) else r[1][:200]
            log.warning("%s on agent %s failed: %s", work.endpoint, agent, why)
    ok = [r for r in results if r[0] == 200]
    if ok:
        return Response(ok[0][1], status_code=200, media_type=ok[0][2] or None)
    if results:
        return Response(results[0][1], status_code=results[0][0], media_type=results[0][2] or JSON)
    return error(CorralError(f"{work.endpoint} failed on every agent"))
