"""``corral auth``: NATS identities with least privilege for a fleet.

    corral auth init DIR [--root R] [--agents ID,ID] [--gateways ID,ID] [--passwords]
    corral auth agent DIR ID
    corral auth gateway DIR ID

Then run nats-server with ``include "DIR/auth.conf"`` (``corral nats --auth DIR/auth.conf``), create
the buckets and the queue stream once with the operator identity (``corral status --nats-creds
DIR/operator.creds``), and give each process its own file (``--nats-creds DIR/gateway.creds``,
``DIR/agent-<id>.creds``, ...).
"""

from __future__ import annotations

import argparse
import sys

from corral.auth.config import (
    AUTH_FILE,
    AuthDirError,
    add_agent,
    add_gateway,
    creds_path,
    init,
    write_authorization,
)
from corral.runtime.natsauth import CredentialsError
from corral.runtime.settings import described


def _ids(raw: str) -> list[str]:
    return [p.strip() for p in raw.split(",") if p.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="corral auth", description=described(__doc__.split("\n\n")[0])
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser(
        "init",
        allow_abbrev=False,
        help="write one identity per role (and per agent) and the server's include",
    )
    i.add_argument("dir", help="where to write them (created; must hold no identities yet)")
    i.add_argument("--root", default="corral", help="the fleet's subject root (default corral)")
    i.add_argument("--agents", type=_ids, default=[], metavar="ID,ID", help="agent ids, one identity each")
    i.add_argument(
        "--gateways",
        type=_ids,
        default=[],
        metavar="ID,ID",
        help="gateway ids (each gateway's --gateway-id), one identity each reading only its own replies",
    )
    i.add_argument("--passwords", action="store_true", help="user/password identities instead of nkeys")
    a = sub.add_parser(
        "agent", allow_abbrev=False, help="add one agent's identity and rebuild the server's include"
    )
    a.add_argument("dir")
    a.add_argument("id", help="the agent's id (its --id)")
    g = sub.add_parser(
        "gateway", allow_abbrev=False, help="add one gateway's identity and rebuild the server's include"
    )
    g.add_argument("dir")
    g.add_argument("id", help="the gateway's id (its --gateway-id)")
    r = sub.add_parser(
        "rebuild",
        allow_abbrev=False,
        help="rebuild the server's include from the identities there, with this version's permissions",
    )
    r.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "init":
            conf = init(args.dir, args.root, args.agents, gateways=args.gateways, passwords=args.passwords)
            print(f"wrote {conf} and one .creds file per identity in {args.dir}")
            print(f'nats-server: include "{conf.resolve()}"; then create the buckets once with')
            print(f"  corral status --root {args.root} --nats-creds {creds_path(args.dir, 'operator')}")
        elif args.command == "rebuild":
            conf = write_authorization(args.dir)
            print(f"{conf} rebuilt: reload nats-server (nats-server --signal reload)")
        else:
            path = (add_agent if args.command == "agent" else add_gateway)(args.dir, args.id)
            print(f"wrote {path}; {AUTH_FILE} rebuilt: reload nats-server (nats-server --signal reload)")
    except (AuthDirError, CredentialsError, ValueError) as e:
        print(f"corral auth: {e}", file=sys.stderr)
        return 2
    return 0
