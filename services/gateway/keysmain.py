"""``corral keys create|list|revoke|usage``: the gateway's API keys (``CORRAL_AUTH=keys``), kept in
JetStream KV (``--nats``, ``--root``). A new key is printed once, alone on stdout; only its hash is
stored. A revoked key is refused by every gateway within a second."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec
from corral.gateway.access import NAME, ROLES, ApiKey
from corral.gateway.keys import KeyBuckets, KeyExists, create_key, list_keys, open_key_buckets, revoke_key
from corral.gateway.limits import Usage, read_usage
from corral.protocol.priority import PRIORITIES
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import require_fleet
from corral.runtime.nats import COMMAND_ERRORS, NatsAuth, NoFleet, command_error, connect_command
from corral.runtime.process import parse_settings
from corral.runtime.settings import SERVICES_ONLY, CommonSettings, add_arguments, described

_enc = msgspec.json.Encoder()


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(f"corral keys: {text}\n")


def _limit(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return n


def _models(raw: str) -> tuple[str, ...]:
    """An allow-list: at least one pattern. An empty one would allow every model, which a script
    passing an unset variable (``--models "$MODELS"``) never meant: leave the option out for that."""
    models = tuple(m.strip() for m in raw.split(",") if m.strip())
    if not models:
        raise argparse.ArgumentTypeError(
            "needs at least one model pattern (leave --models out for every model)"
        )
    return models


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="corral keys", description=described(__doc__))
    commands = p.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", allow_abbrev=False, help="make a key; prints only the key, once")
    create.add_argument("name", help="the key's name: letters, digits, _ and -, at most 64")
    create.add_argument("--role", choices=ROLES, default="user", help="user (inference, views) or admin")
    create.add_argument(
        "--models", type=_models, default=(), metavar="GLOB,...", help="allowed models (default: all)"
    )
    create.add_argument("--rpm", type=_limit, default=0, metavar="N", help="requests per minute (0: none)")
    create.add_argument("--tpm", type=_limit, default=0, metavar="N", help="tokens per minute (0: none)")
    create.add_argument(
        "--concurrency", type=_limit, default=0, metavar="N", help="requests at once per gateway"
    )
    create.add_argument(
        "--priority",
        choices=PRIORITIES,
        default="interactive",
        help="the highest priority its requests get (batch: only slots no interactive request waits for)",
    )
    commands.add_parser("list", allow_abbrev=False, help="every key, without the keys themselves")
    revoke = commands.add_parser("revoke", allow_abbrev=False, help="refuse a key from now on")
    revoke.add_argument("name")
    usage = commands.add_parser(
        "usage", allow_abbrev=False, help="requests, tokens and errors per key, model, hour and day"
    )
    usage.add_argument("name", nargs="?", help="only this key")
    for sub in (create, commands.choices["list"], revoke, usage):
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        add_arguments(sub, CommonSettings, leave=SERVICES_ONLY)
    return p


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _shown(k: ApiKey) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(k)
    out.pop("hash")
    return out


async def _run(args: argparse.Namespace, buckets: KeyBuckets) -> int:
    if args.command == "create":
        models = args.models
        try:
            key = await create_key(
                buckets.keys,
                args.name,
                role=args.role,
                models=models,
                rpm=args.rpm,
                tpm=args.tpm,
                concurrency=args.concurrency,
                priority=args.priority,
            )
        except KeyExists:
            _err(f"a key named {args.name!r} exists; revoke it first")
            return 1
        if args.json:  # the key, once, beside what it may do
            made = [_shown(k) for k in await list_keys(buckets.keys) if k.name == args.name]
            _out(_enc.encode({"key": key, **(made[0] if made else {"name": args.name})}).decode())
        else:
            _out(key)
        return 0
    if args.command == "list":
        keys = await list_keys(buckets.keys)
        if args.json:
            _out(_enc.encode([_shown(k) for k in keys]).decode())
        else:
            rows = [[k.name, k.role, ",".join(k.models) or "*", k.rpm or "-", k.tpm or "-", k.concurrency or "-", k.priority]
                    for k in keys]  # fmt: skip
            _out(_table(rows, ["NAME", "ROLE", "MODELS", "RPM", "TPM", "CONCURRENCY", "PRIORITY"]))
        return 0
    if args.command == "revoke":
        if not await revoke_key(buckets.keys, args.name):
            _err(f"no key named {args.name!r}")
            return 1
        if args.json:
            _out(_enc.encode({"name": args.name, "revoked": True}).decode())
        return 0
    used: list[Usage] = await read_usage(buckets.usage, args.name)
    if (
        args.name is not None
        and not used
        and args.name not in {k.name for k in await list_keys(buckets.keys)}
    ):
        _err(f"no key named {args.name!r}")  # a revoked key's usage is still shown, while it lasts
        return 1
    if args.json:
        _out(_enc.encode(used).decode())
    else:
        table = [
            [r.key, r.model or "-", r.period, r.requests, r.prompt_tokens, r.eval_tokens, r.errors]
            for r in used
        ]
        _out(_table(table, ["KEY", "MODEL", "PERIOD", "REQUESTS", "PROMPT", "EVAL", "ERRORS"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parsed = parse_settings(parser(), CommonSettings, argv)
    if parsed is None:
        return 2
    args, settings = parsed
    if getattr(args, "name", None) is not None and not NAME.fullmatch(args.name):
        _err("a key's name is 1 to 64 letters, digits, _ and -")
        return 2

    async def go() -> int:
        nc = await connect_command(settings.nats_url, name="corral-keys", auth=NatsAuth.of(settings))
        try:
            subjects = Subjects(settings.root)
            try:
                await require_fleet(nc.jetstream(), subjects)
            except NoFleet as e:  # keys may come first, but a mistyped root makes keys no gateway reads
                _err(f"note: {e}; gateways read the keys of their own root")
            buckets = await open_key_buckets(nc.jetstream(), subjects, replicas=settings.js_replicas)
            return await _run(args, buckets)
        finally:
            await nc.drain()

    try:
        return asyncio.run(go())
    except COMMAND_ERRORS as e:
        _err(command_error(settings.nats_url, e))
        return 1
