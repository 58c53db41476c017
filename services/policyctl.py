"""``corral alias``, ``corral fallback``, ``corral pin`` and ``corral unpin``: the fleet's model
aliases, fallbacks and models kept warm, from a terminal.

They talk to NATS directly (``--nats``, ``--root``) and change the one record of the policy bucket
(`corral.gateway.policy`) by compare-and-set, so two people changing rules at once lose nothing.
Every gateway watches that record: a change applies everywhere within a second; the registry
watches it for the pins (`corral.registry.pins`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable

import msgspec
from corral.gateway.policy import MAX_FALLBACKS, model_key
from corral.protocol.errors import InvalidModelName
from corral.protocol.names import VENDORS
from corral.protocol.subjects import Subjects
from corral.registry.lease import held
from corral.registry.pins import LEASE_KEY, LEASE_S
from corral.runtime.buckets import BUCKETS, kv_create, open_bucket, require_fleet
from corral.runtime.fleet import FleetView
from corral.runtime.kvwatch import watching
from corral.runtime.nats import COMMAND_ERRORS, NatsAuth, command_error, connect_command
from corral.runtime.policy import POLICY_KEY, Policy, policy_decoder, policy_encoder
from corral.runtime.process import parse_settings
from corral.runtime.settings import SERVICES_ONLY, CommonSettings, add_arguments
from corral.views.status import Pin
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

COMMANDS = {
    "alias": "serve a model name with another model (e.g. gpt-4o-mini with llama3.1:8b)",
    "fallback": "models that serve a model that cannot start within its deadline",
    "pin": "keep a model loaded on N agents (the registry re-places it when one goes)",
    "unpin": "stop keeping a model loaded",
}
_TRIES = 10  # compare-and-set rounds before giving up on a record others keep changing
KEEPER_WAIT_S = 3.0  # how long `corral pin` waits for a registry to act on a new pin before it warns


def table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    width = max(len(r[0]) for r in [header, *rows])
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in [header, *rows])


class PolicyError(Exception):
    """A rule that cannot be stored (the message says why)."""


Change = Callable[[Policy], Policy]


def set_alias(name: str, target: str) -> Change:
    alias, served = model_key(name), model_key(target)
    if alias == served:
        raise PolicyError(f"{name} cannot be an alias of itself")

    def change(p: Policy) -> Policy:
        if served in p.aliases:
            raise PolicyError(f"{target} is an alias itself (aliases are followed once): name its model")
        if alias in p.aliases.values():
            raise PolicyError(f"{name} is the model of another alias: remove that alias first")
        return msgspec.structs.replace(p, aliases={**p.aliases, alias: served})

    return change


def remove_alias(name: str) -> Change:
    alias = model_key(name)

    def change(p: Policy) -> Policy:
        if alias not in p.aliases:
            raise PolicyError(f"no alias {name}")
        return msgspec.structs.replace(p, aliases={k: v for k, v in p.aliases.items() if k != alias})

    return change


def set_fallback(model: str, to: list[str]) -> Change:
    key = model_key(model)
    targets = tuple(dict.fromkeys(model_key(t) for t in to))
    if not targets:
        raise PolicyError("--to needs at least one model")
    if key in targets:
        raise PolicyError(f"{model} cannot fall back to itself")
    if len(targets) > MAX_FALLBACKS:
        raise PolicyError(f"at most {MAX_FALLBACKS} fallbacks per model")

    def change(p: Policy) -> Policy:
        return msgspec.structs.replace(p, fallbacks={**p.fallbacks, key: targets})

    return change


def remove_fallback(model: str) -> Change:
    key = model_key(model)

    def change(p: Policy) -> Policy:
        if key not in p.fallbacks:
            raise PolicyError(f"no fallbacks for {model}")
        return msgspec.structs.replace(p, fallbacks={k: v for k, v in p.fallbacks.items() if k != key})

    return change


def set_pin(model: str, replicas: int, vendor: str | None) -> Change:
    key = model_key(model)
    if replicas < 1:
        raise PolicyError("--replicas must be at least 1 (corral unpin MODEL lets a model go)")
    if vendor is not None and vendor not in VENDORS:
        raise PolicyError(f"unknown vendor {vendor!r}; valid: {', '.join(VENDORS)}")

    def change(p: Policy) -> Policy:
        return msgspec.structs.replace(p, pins={**p.pins, key: Pin(replicas=replicas, vendor=vendor)})

    return change


def remove_pin(model: str) -> Change:
    key = model_key(model)

    def change(p: Policy) -> Policy:
        if key not in p.pins:
            raise PolicyError(f"{model} is not pinned")
        return msgspec.structs.replace(p, pins={k: v for k, v in p.pins.items() if k != key})

    return change


async def read(kv: KeyValue) -> tuple[Policy, int | None]:
    """The rules and their revision (None: never written, or deleted)."""
    try:
        entry = await kv.get(POLICY_KEY)
    except KeyNotFoundError:
        return Policy(), None
    if not entry.value:
        return Policy(), entry.revision
    return policy_decoder.decode(entry.value), entry.revision


async def apply(kv: KeyValue, change: Change) -> Policy:
    """Read, change and write the rules, again when someone else wrote them meanwhile."""
    for _ in range(_TRIES):
        policy, revision = await read(kv)
        new = change(policy)
        value = policy_encoder.encode(new)
        try:
            if revision is None:
                await kv_create(kv, POLICY_KEY, value)
            else:
                await kv.update(POLICY_KEY, value, last=revision)
        except KeyWrongLastSequenceError:
            continue
        return new
    raise PolicyError("the rules kept changing under this command; try again")


async def keeper_heard(nc: NATS, subjects: Subjects, settings: CommonSettings) -> bool:
    """Whether a registry keeps the pins: one holds the keeper lease, or takes it within
    `KEEPER_WAIT_S` (a registry acts on a change of the pins at once, taking the lease if none holds it).
    A watch of the lease gives its value now, then each write."""
    views = await open_bucket(
        nc.jetstream(), subjects.views_bucket, BUCKETS["views"], replicas=settings.js_replicas
    )
    async with watching(views, LEASE_KEY) as watch:
        with contextlib.suppress(TimeoutError):  # the wait's end (nats-py's own timeout is one too)
            async with asyncio.timeout(KEEPER_WAIT_S):
                while True:
                    entry = await watch.updates(KEEPER_WAIT_S)
                    if entry is not None and held(entry.value, LEASE_S):
                        return True
    return False


async def _fleet_notes(
    command: str, args: argparse.Namespace, nc: NATS, subjects: Subjects, settings: CommonSettings
) -> list[str]:
    """`fleet_notes` on the fleet as the agents bucket has it now."""
    agents = await open_bucket(
        nc.jetstream(), subjects.agents_bucket, BUCKETS["agents"], replicas=settings.js_replicas
    )
    fleet = FleetView(agents)
    await fleet.start()
    try:
        return fleet_notes(command, args, fleet)
    finally:
        await fleet.stop()


def fleet_notes(command: str, args: argparse.Namespace, fleet: FleetView) -> list[str]:
    """What a new rule means for the fleet as it is now, worth a line on stderr: a model it names
    that no agent has, an alias that hides a model agents have, a pin with too few agents to keep
    it on. The rule is stored all the same (models come and go)."""
    notes: list[str] = []
    if command == "alias" and args.name and args.target:
        if fleet.has_model(model_key(args.name)):
            notes.append(f"agents have a model named {args.name}: requests for it now go to "
                         f"{args.target} (pull, delete and show still reach {args.name})")  # fmt: skip
        if not fleet.has_model(model_key(args.target)):
            notes.append(f"no agent has {args.target} now: requests for {args.name} are answered "
                         "404 until one does")  # fmt: skip
    elif command == "fallback" and args.model and args.to:
        missing = [
            t for t in (t.strip() for t in args.to.split(",")) if t and not fleet.has_model(model_key(t))
        ]
        if missing:
            notes.append(f"no agent has {', '.join(missing)} now: a fallback to it is skipped until one does")
    elif command == "pin" and args.model:
        holders = [a for a in fleet.with_model(model_key(args.model)) if args.vendor in (None, a.vendor)]
        agents = f"{args.vendor} agent" if args.vendor else "agent"
        if len(holders) < args.replicas:
            notes.append(
                f"{len(holders)} {agents}(s) have {args.model} on disk, {args.replicas} wanted: "
                f"pins load only where it is (`corral pull {args.model}` puts it on more)"
            )
    return notes


def show(command: str, policy: Policy, as_json: bool) -> None:
    if command in ("pin", "unpin"):
        if as_json:
            print(policy_encoder.encode(policy.pins).decode())
        elif policy.pins:
            rows = [
                (k, f"{p.replicas}" + (f" ({p.vendor})" if p.vendor else ""))
                for k, p in sorted(policy.pins.items())
            ]
            print(table(rows, ("MODEL", "REPLICAS")))
        else:
            print("no pins")
        return
    if command == "alias":
        if as_json:
            print(policy_encoder.encode(policy.aliases).decode())
        elif policy.aliases:
            print(table(sorted(policy.aliases.items()), ("ALIAS", "MODEL")))
        else:
            print("no aliases")
        return
    if as_json:
        print(policy_encoder.encode(policy.fallbacks).decode())
    elif policy.fallbacks:
        rows = [(k, ", ".join(v)) for k, v in sorted(policy.fallbacks.items())]
        print(table(rows, ("MODEL", "FALLBACKS (in order)")))
    else:
        print("no fallbacks")


def parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog=f"corral {command}", description=COMMANDS[command])
    if command == "alias":
        p.add_argument("name", nargs="?", help="the name clients use, e.g. gpt-4o-mini")
        p.add_argument("target", nargs="?", help="the model that serves it, e.g. llama3.1:8b")
        p.add_argument("--rm", metavar="NAME", help="remove the alias NAME")
    elif command == "pin":
        p.add_argument("model", nargs="?", help="the model to keep loaded, e.g. llama3.2:1b")
        p.add_argument("--replicas", type=int, default=1, help="on how many agents (default 1)")
        p.add_argument("--vendor", help="only agents of this vendor")
    elif command == "unpin":
        p.add_argument("model", help="the model to let go of")
    else:
        p.add_argument("model", nargs="?", help="the model, e.g. llama3.1:70b")
        p.add_argument("--to", help="the models that serve it, in order, comma-separated")
        p.add_argument("--rm", metavar="MODEL", help="remove the fallbacks of MODEL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_arguments(p, CommonSettings, leave=SERVICES_ONLY)
    return p


def _change(command: str, args: argparse.Namespace) -> Change | None:
    """The change the arguments ask for; None to list. `PolicyError` or `InvalidModelName` when wrong."""
    if command == "pin":
        return None if args.model is None else set_pin(args.model, args.replicas, args.vendor)
    if command == "unpin":
        return remove_pin(args.model)
    if command == "alias":
        if args.rm:
            if args.name or args.target:
                raise PolicyError("--rm NAME takes no other names")
            return remove_alias(args.rm)
        if args.name is None:
            return None
        if args.target is None:
            raise PolicyError("name the model that serves the alias: corral alias NAME MODEL")
        return set_alias(args.name, args.target)
    if args.rm:
        if args.model or args.to:
            raise PolicyError("--rm MODEL takes no other arguments")
        return remove_fallback(args.rm)
    if args.model is None:
        return None
    if not args.to:
        raise PolicyError("name the fallbacks: corral fallback MODEL --to M2[,M3]")
    return set_fallback(args.model, [t.strip() for t in args.to.split(",") if t.strip()])


def main(command: str, argv: list[str] | None = None) -> int:
    parsed = parse_settings(parser(command), CommonSettings, argv)
    if parsed is None:
        return 2
    args, settings = parsed
    try:
        change = _change(command, args)
    except (PolicyError, InvalidModelName) as e:
        print(f"corral {command}: {e}", file=sys.stderr)
        return 2

    async def go() -> int:
        nc = await connect_command(settings.nats_url, name="corral-cli", auth=NatsAuth.of(settings))
        try:
            subjects = Subjects(settings.root)
            await require_fleet(nc.jetstream(), subjects)  # not the stores of a mistyped root
            kv = await open_bucket(
                nc.jetstream(), subjects.policy_bucket, BUCKETS["policy"], replicas=settings.js_replicas
            )
            if change is None:
                policy, _ = await read(kv)
            else:
                try:
                    policy = await apply(kv, change)
                except PolicyError as e:
                    print(f"corral {command}: {e}", file=sys.stderr)
                    return 1
            show(command, policy, args.json)
            if change is not None:
                try:
                    notes = await _fleet_notes(command, args, nc, subjects, settings)
                except COMMAND_ERRORS as e:  # the rule is stored: nothing to fail for
                    log.debug("cannot read the fleet for notes on the rule: %r", e)
                    notes = []
                for note in notes:
                    print(f"corral {command}: note: {note}", file=sys.stderr)
            if command == "pin" and change is not None and not await keeper_heard(nc, subjects, settings):
                print(
                    f"corral pin: no registry keeps the pins now (none took the keeper lease within "
                    f"{KEEPER_WAIT_S:.0f} s): the pin is kept, and loads once `corral registry` runs",
                    file=sys.stderr,
                )
            return 0
        finally:
            await nc.drain()

    try:
        return asyncio.run(go())
    except COMMAND_ERRORS as e:
        print(f"corral {command}: {command_error(settings.nats_url, e)}", file=sys.stderr)
        return 1
