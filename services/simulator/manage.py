"""Model-management routes: version, tags, ps, show, pull, push, create, copy, delete, blobs
(https://github.com/ollama/ollama/blob/main/docs/api.md)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any, Final

import msgspec
from aiohttp import web
from corral.protocol.errors import BadRequest, CorralError, InvalidModelName, ModelNotFound
from corral.protocol.names import ModelName, parse_name
from corral.simulator.catalog import Layer, LocalModel
from corral.simulator.context import SimContext
from corral.simulator.durations import format_local
from corral.simulator.responses import (
    Details,
    Progress,
    PsModel,
    StreamWriter,
    TagModel,
    empty_response,
    encode,
    error_response,
    json_response,
)
from corral.simulator.wire import CopyRequest, CreateRequest, ModelRequest, decode

_DIGEST_RE: Final = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_TICK_S: Final = 0.06  # Ollama's pull progress tick
_MAX_TICKS: Final = 100  # per layer, so huge pulls do not flood the stream
NO_MANIFEST: Final = (
    "pull model manifest: file does not exist"  # a pull of what the registry lacks (the CLI matches it)
)
_F16: Final = frozenset({"F16", "F32", "BF16"})


def details_of(m: LocalModel) -> Details:
    c = m.config
    return Details(
        parent_model=m.parent_model,
        format="gguf",
        family=c.family,
        families=[c.family],
        parameter_size=c.parameter_size,
        quantization_level=c.quantization,
    )


def _parse(raw: str) -> ModelName:
    return parse_name(raw)  # InvalidModelName → 400 "invalid model name"


class ManageRoutes:
    def __init__(self, ctx: SimContext) -> None:
        self.ctx = ctx
        # bytes of each layer a cut pull left on disk: the next pull resumes there, as Ollama's
        # downloader resumes its partial blob files
        self.partial: dict[str, int] = {}

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps, allow_head=False)
        r.add_post("/api/show", self.show)
        r.add_post("/api/pull", self.pull)
        r.add_post("/api/push", self.push)
        r.add_post("/api/create", self.create)
        r.add_post("/api/copy", self.copy)
        r.add_delete("/api/delete", self.delete)
        r.add_head("/api/blobs/{digest}", self.head_blob)
        r.add_post("/api/blobs/{digest}", self.post_blob)

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.ctx.config.version})

    async def tags(self, request: web.Request) -> web.Response:
        models = [
            TagModel(
                name=m.display,
                model=m.display,
                modified_at=format_local(m.modified_at),
                size=m.size,
                digest=m.digest,
                details=details_of(m),
                capabilities=list(m.config.capabilities),
            )
            for m in self.ctx.catalog.listing()
        ]
        return json_response({"models": models})

    async def ps(self, request: web.Request) -> web.Response:
        runners = sorted(self.ctx.scheduler.runners.values(), key=lambda r: r.expires_at, reverse=True)
        models = [
            PsModel(
                name=r.model.display,
                model=r.model.display,
                size=r.size,
                digest=r.model.digest,
                details=details_of(r.model),
                expires_at=format_local(r.expires_at),
                size_vram=r.size_vram,
                context_length=r.options.num_ctx,
            )
            for r in runners
        ]
        return json_response({"models": models})

    # ---- show ---------------------------------------------------------------------------------

    async def show(self, request: web.Request) -> web.Response:
        try:
            req = decode(await request.read(), ModelRequest, "ShowRequest")
            raw = req.target
            if not raw:
                raise BadRequest("model is required")
            name = _parse(raw)
            m = self.ctx.catalog.models.get(name.key)
            if m is None:
                raise ModelNotFound(f"model '{name.display}' not found")
        except CorralError as e:
            return error_response(e.status, e.message)
        return json_response(show_body(m, verbose=bool(req.verbose)))

    # ---- pull / push --------------------------------------------------------------------------

    async def pull(self, request: web.Request) -> web.StreamResponse:
        ctx = self.ctx
        try:
            req = decode(await request.read(), ModelRequest, "PullRequest")
            if not req.target:
                raise BadRequest("invalid model name")  # Ollama parses the empty name
            name = _parse(req.target)
        except CorralError as e:
            return error_response(e.status, e.message)
        ctx.stats.bump("pulls")
        stream = req.stream is not False
        writer = StreamWriter(request)

        async def say(p: Progress) -> None:
            if stream:
                await writer.write(encode(p) + b"\n")

        try:
            if not await self._fetch(name, say):
                if not stream:
                    return error_response(500, NO_MANIFEST)
                await writer.write(encode({"error": NO_MANIFEST}) + b"\n")
                return await writer.finish()
            await say(Progress("success"))
        except ConnectionError:
            ctx.stats.bump("pulls_cut")
            return writer.response or web.Response(status=499)
        except asyncio.CancelledError:  # the client went away: aiohttp cancels its handler
            ctx.stats.bump("pulls_cut")
            raise
        finally:
            ctx.stats.bump("pulls_ended")
        if not stream:
            return json_response(Progress("success"))
        return await writer.finish()

    async def _fetch(self, name: ModelName, say: Any) -> bool:
        """Pull ``name`` from the simulated registry to disk: its manifest, layers, the digest check
        (the last ``success`` line is the caller's); False when the registry has no such model (the
        caller's error is `NO_MANIFEST`)."""
        ctx = self.ctx
        await say(Progress("pulling manifest"))
        offer = ctx.catalog.registry.get(name.key)
        if offer is None:
            return False
        existing = ctx.catalog.models.get(name.key)
        target = LocalModel(name=existing.name if existing else name, config=offer, modified_at=time.time())
        have = ctx.catalog.layer_digests(ctx.catalog.models.values())
        for layer in target.layers:
            await self._transfer(
                layer, layer.digest in have, ctx.config.pull_bandwidth, "pulling", say, self.partial
            )
        await say(Progress("verifying sha256 digest"))
        await say(Progress("writing manifest"))
        if existing is not None and existing.digest != target.digest:
            await say(Progress("removing unused layers"))
        ctx.catalog.models[name.key] = target
        for layer in target.layers:  # on disk as the model's now
            self.partial.pop(layer.digest, None)
        return True

    async def _transfer(
        self,
        layer: Layer,
        cached: bool,
        bandwidth: float,
        verb: str,
        say: Any,
        partial: dict[str, int] | None = None,
    ) -> None:
        """Move one layer at ``bandwidth``, saying its progress; ``partial``: where cut transfers
        left off, kept for the next one to resume from."""
        status = f"{verb} {layer.digest[7:19]}"
        if cached:
            await say(Progress(status, layer.digest, layer.size, layer.size))
            return
        done = partial.get(layer.digest, 0) if partial is not None else 0
        await say(Progress(status, layer.digest, layer.size, done))
        seconds = (layer.size - done) / bandwidth
        ticks = max(1, min(_MAX_TICKS, int(seconds / _TICK_S)))
        for i in range(1, ticks + 1):
            await self.ctx.clock.sleep(seconds / ticks)
            now = done + (layer.size - done) * i // ticks
            if partial is not None:
                partial[layer.digest] = now
            await say(Progress(status, layer.digest, layer.size, now))

    async def push(self, request: web.Request) -> web.StreamResponse:
        ctx = self.ctx
        try:
            req = decode(await request.read(), ModelRequest, "PushRequest")
            if not req.target:
                raise BadRequest("model is required")
            name = _parse(req.target)
            m = ctx.catalog.models.get(name.key)
            if m is None:
                raise ModelNotFound(f"model '{name.display}' not found")
        except CorralError as e:
            return error_response(e.status, e.message)
        stream = req.stream is not False
        writer = StreamWriter(request)

        async def say(p: Progress) -> None:
            if stream:
                await writer.write(encode(p) + b"\n")

        try:
            await say(Progress("retrieving manifest"))
            for layer in m.layers:
                await say(Progress("starting upload", layer.digest, layer.size))
                await self._transfer(layer, False, ctx.config.push_bandwidth, "pushing", say)
            await say(Progress("pushing manifest"))
            await say(Progress("success"))
        except ConnectionError:
            return writer.response or web.Response(status=499)
        if not stream:
            return json_response(Progress("success"))
        return await writer.finish()

    # ---- create / copy / delete ---------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        ctx = self.ctx
        try:
            req = decode(await request.read(), CreateRequest)
            if not req.target:
                raise BadRequest("model is required")
            name = _parse(req.target)
            source, steps = self._create_source(req)
        except CorralError as e:
            return error_response(e.status, e.message)
        stream = req.stream is not False
        writer = StreamWriter(request)

        async def say(p: Progress) -> None:
            if stream:
                await writer.write(encode(p) + b"\n")

        async def fail(msg: str, status: int) -> web.StreamResponse:
            if not stream:
                return error_response(status, msg)
            await writer.write(encode({"error": msg}) + b"\n")
            return await writer.finish()

        try:
            if isinstance(source, ModelName):  # a base not on disk: Ollama pulls it first
                if not await self._fetch(source, say):
                    return await fail(NO_MANIFEST, 500)
                await say(Progress("success"))  # the pull's own last line, as Ollama streams it
                source = ctx.catalog.models[source.key]
            config = source.config
            for s in steps:
                await say(Progress(s))
            if req.quantize:
                if config.quantization.upper() not in _F16:
                    return await fail("quantization is only supported for F16 and F32 models", 400)
                q = req.quantize.upper()
                total = config.size
                status = f"quantizing {config.quantization.upper()} model to {q}"
                for i in range(1, 11):
                    await ctx.clock.sleep(total / 2e9 / 10)
                    await say(Progress(status, "0", total, total * i // 10))
                config = ctx.catalog.quantized(config, q)
            license_ = req.license if isinstance(req.license, str) else "\n".join(req.license or [])
            new = LocalModel(
                name=name,
                config=config,
                modified_at=time.time(),
                system=source.system if req.system is None else req.system,
                template=source.template if req.template is None else req.template,
                license=license_ or source.license,
                parameters={**source.parameters, **(req.parameters or {})},
                parent_model=source.display if source.display != name.display else source.parent_model,
            )
            old = {layer.digest for layer in source.layers}
            for layer in new.layers:
                verb = "using existing" if layer.digest in old else "creating new"
                await say(Progress(f"{verb} layer {layer.digest}"))
            await say(Progress("writing manifest"))
            ctx.catalog.models[name.key] = new
            await say(Progress("success"))
        except ConnectionError:
            return writer.response or web.Response(status=499)
        if not stream:
            return json_response(Progress("success"))
        return await writer.finish()

    def _create_source(self, req: CreateRequest) -> tuple[LocalModel | ModelName, list[str]]:
        """The model a create starts from, or the name of a base not on disk (to be pulled), and
        the steps it reports first."""
        catalog = self.ctx.catalog
        if req.from_:
            try:
                src = catalog.get(req.from_)
                return (src if src is not None else _parse(req.from_)), []
            except InvalidModelName:
                raise BadRequest("invalid model name") from None
        if req.files:
            size = 0
            for digest in req.files.values():
                blob = catalog.blobs.get(digest.replace("-", ":", 1).lower())
                if blob is None:
                    raise BadRequest(f'blob "{digest}" not found')
                size += len(blob)
            config = msgspec.structs.replace(
                next(iter(catalog.registry.values())),
                name=req.target,
                size_gb=max(size, 1) / 1e9,
                parameter_size="",
                quantization="F16",
            )
            model = LocalModel(name=_parse(req.target), config=config, modified_at=time.time())
            return model, ["parsing GGUF"]
        raise BadRequest("neither 'from' or 'files' was specified")

    async def copy(self, request: web.Request) -> web.Response:
        catalog = self.ctx.catalog
        try:
            req = decode(await request.read(), CopyRequest)
            src_raw, dst_raw = req.source or "", req.destination or ""
            try:
                src_name = parse_name(src_raw)
            except InvalidModelName:
                raise BadRequest(f'source "{src_raw}" is invalid') from None
            try:
                dst_name = parse_name(dst_raw)
            except InvalidModelName:
                raise BadRequest(f'destination "{dst_raw}" is invalid') from None
            src = catalog.models.get(src_name.key)
            if src is None:
                raise ModelNotFound(f'model "{src_raw}" not found')
        except CorralError as e:
            return error_response(e.status, e.message)
        catalog.copy(src, dst_name)
        return empty_response(200)

    async def delete(self, request: web.Request) -> web.Response:
        catalog = self.ctx.catalog
        try:
            req = decode(await request.read(), ModelRequest, "DeleteRequest")
            raw = req.target
            try:
                name = parse_name(raw)
            except InvalidModelName:
                raise BadRequest(f'name "{raw}" is invalid') from None
            if catalog.models.pop(name.key, None) is None:
                raise ModelNotFound(f"model '{raw}' not found")
        except CorralError as e:
            return error_response(e.status, e.message)
        return empty_response(200)

    # ---- blobs --------------------------------------------------------------------------------

    def _digest(self, request: web.Request) -> str:
        raw = request.match_info["digest"]
        m = _DIGEST_RE.fullmatch(raw)
        if m is None:
            raise BadRequest("invalid digest format")
        return "sha256:" + m.group(1).lower()

    async def head_blob(self, request: web.Request) -> web.Response:
        try:
            digest = self._digest(request)
        except CorralError as e:
            return error_response(e.status, e.message)
        if digest not in self.ctx.catalog.blobs:
            return error_response(404, f'blob "{digest}" not found')
        return empty_response(200)

    async def post_blob(self, request: web.Request) -> web.Response:
        try:
            digest = self._digest(request)
        except CorralError as e:
            return error_response(e.status, e.message)
        # as Ollama: the body is hashed as it streams in (an upload may be far larger than memory
        # holds at once), a blob already present answers 200, a digest that does not match 400
        blobs = self.ctx.catalog.blobs
        known = digest in blobs
        sha = hashlib.sha256()
        parts: list[bytes] = []
        async for piece in request.content.iter_any():
            if not known:
                sha.update(piece)
                parts.append(piece)
        if known:
            return empty_response(200)
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            return error_response(400, f'digest mismatch, expected "{digest}", got "{got}"')
        blobs[digest] = b"".join(parts)  # the simulated disk
        return empty_response(201)


def show_body(m: LocalModel, *, verbose: bool) -> dict[str, Any]:
    c = m.config
    arch = c.family.replace("-", "_")
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": m.name.model,
        "general.file_type": 1 if c.quantization.upper() == "F16" else 15,
        "general.parameter_count": c.parameter_count,
        "general.quantization_version": 2,
        f"{arch}.attention.head_count": c.head_count_kv * 4,
        f"{arch}.attention.head_count_kv": c.head_count_kv,
        f"{arch}.attention.key_length": c.head_dim,
        f"{arch}.attention.value_length": c.head_dim,
        f"{arch}.block_count": c.layers,
        f"{arch}.context_length": c.trained_context,
        f"{arch}.embedding_length": c.embedding_dim,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<s>", "</s>", "<unk>", "a", "b", "c"] if verbose else [],
    }
    params = "\n".join(_param_lines(m.parameters))
    layers = m.layers
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        "# To build a new Modelfile based on this, replace FROM with:\n"
        f"# FROM {m.display}\n\n"
        f"FROM /root/.ollama/models/blobs/{layers[0].digest.replace(':', '-')}\n"
        f'TEMPLATE """{m.template}"""\n'
        + (f'SYSTEM """{m.system}"""\n' if m.system else "")
        + "".join(f"PARAMETER {line}\n" for line in _param_lines(m.parameters, modelfile=True))
    )
    body: dict[str, Any] = {"license": m.license or f"{c.family} license", "modelfile": modelfile}
    if params:
        body["parameters"] = params
    body["template"] = m.template
    if m.system:
        body["system"] = m.system
    body["details"] = details_of(m)
    body["model_info"] = info
    body["capabilities"] = list(c.capabilities)
    body["modified_at"] = format_local(m.modified_at)
    return body


def _param_lines(params: dict[str, Any], *, modelfile: bool = False) -> list[str]:
    lines = []
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            val = (
                f'"{item}"'
                if isinstance(item, str)
                else str(item).lower()
                if isinstance(item, bool)
                else item
            )
            lines.append(f"{k} {val}" if modelfile else f"{k:<30} {val}")
    return lines
