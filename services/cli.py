"""``corral``: one command, a subcommand per process. Each takes ``--help``."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "up": ("corral.up", "the whole fleet here: NATS, agents, gateway (simulated GPUs by default)"),
    "nats": ("corral.runtime.natsmain", "an embedded nats-server with JetStream"),
    "sim": ("corral.simulator.__main__", "a simulated Ollama GPU server"),
    "gateway": ("corral.gateway.__main__", "the Ollama-compatible HTTP endpoint"),
    "agent": ("corral.agent.__main__", "an agent beside one Ollama"),
    "registry": ("corral.registry.__main__", "fleet membership and fleet-wide pulls"),
    "aggregator": ("corral.aggregator.__main__", "merged views and rolling figures in KV"),
    "auth": ("corral.auth.main", "NATS identities with least privilege: one per role and agent"),
    "keys": ("corral.gateway.keysmain", "the gateway's API keys: create, list, revoke, usage"),
    "top": ("corral.top", "a live terminal view of the fleet, read from a gateway over HTTP"),
    "batch": ("corral.batchctl", "OpenAI batch jobs on a gateway: submit, status, results, cancel, list"),
}
FLEET_COMMANDS = {
    "status": "the fleet at a glance",
    "ps": "loaded models, one row per agent",
    "models": "models on disk and where",
    "pull": "pull a model onto N agents, with progress",
    "drain": "no new work for an agent; running requests finish",
    "cordon": "no new work for an agent",
    "uncordon": "let an agent take work again",
}
POLICY_COMMANDS = {  # `corral.policyctl`
    "alias": "serve a model name with another model",
    "fallback": "models that serve a model that cannot start in time",
    "pin": "keep a model loaded on N agents",
    "unpin": "stop keeping a model loaded",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    fleet = "\n".join(f"  {name:<10} {text}" for name, text in (FLEET_COMMANDS | POLICY_COMMANDS).items())
    return (
        f"usage: corral <command> [options]\n\nprocesses:\n{rows}\n\nthe fleet (over NATS):\n{fleet}\n\n"
        "'corral <command> --help' for its options."
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command. Output piped into a reader that stops early (``corral status | head``),
    and Ctrl-C, end the command quietly, as other command-line tools do, not with a traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C on a command (a long `corral pull`): no traceback
        return 130  # what a shell reports for a command ended by SIGINT (128 + 2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # what a shell reports for a command ended by SIGPIPE (128 + 13)
    return code


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from corral import __version__

        print(f"corral {__version__}")
        return 0
    if args[0] in POLICY_COMMANDS:
        from corral import policyctl

        return policyctl.main(args[0], args[1:])
    if args[0] in FLEET_COMMANDS:
        from corral import fleetctl

        return fleetctl.main(args[0], args[1:])
    if args[0] not in COMMANDS:
        print(f"corral: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
