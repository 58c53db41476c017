"""The files of a fleet's NATS identities: one credentials file per identity, and the nats-server
authorization include built from all of them.

``DIR/root`` names the subject root; ``DIR/<user>.creds`` holds each identity (`corral.runtime.
natsauth`); ``DIR/auth.conf`` is what nats-server includes (``include "auth.conf"``): one user per
identity with its permissions (`corral.auth.permissions`). Adding an agent writes its credentials and
builds ``auth.conf`` again from every credentials file; ``nats-server --signal reload`` (or SIGHUP)
makes a running server read it.

An nkey identity keeps its seed in its credentials file only: the server's file holds the public
key. A password identity's password is in both (file mode 0600).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import nkeys
from corral.auth.permissions import (
    ROLES,
    Permissions,
    agent_user,
    gateway_user,
    inbox_prefix,
    role_permissions,
)
from corral.protocol.subjects import Subjects, check_agent_id, check_gateway_id
from corral.runtime.natsauth import Credentials, read_credentials

AUTH_FILE = "auth.conf"
ROOT_FILE = "root"
CREDS_SUFFIX = ".creds"


class AuthDirError(ValueError):
    """A directory that is not (or already is) a set of Corral NATS identities."""


def new_identity(user: str, *, password: bool = False) -> Credentials:
    if password:
        return Credentials(user, inbox_prefix(user), password=secrets.token_urlsafe(24))
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    return Credentials(user, inbox_prefix(user), nkey=seed.decode())


def public_key(c: Credentials) -> str:
    return str(nkeys.from_seed(bytearray(c.nkey.encode())).public_key.decode())


def creds_path(directory: str | Path, user: str) -> Path:
    return Path(directory) / f"{user}{CREDS_SUFFIX}"


def init(
    directory: str | Path,
    root: str,
    agents: Iterable[str] = (),
    *,
    gateways: Iterable[str] = (),
    passwords: bool = False,
) -> Path:
    """Write every role's identity, one per agent in ``agents`` and per gateway in ``gateways``, and
    ``auth.conf``; returns the latter. Refuses a directory that already holds identities (they
    would be replaced)."""
    d = Path(directory)
    subjects = Subjects(root)  # validates the root
    if (d / ROOT_FILE).exists() or any(d.glob(f"*{CREDS_SUFFIX}")):
        raise AuthDirError(f"{d} already holds NATS identities: use 'corral auth agent' to add an agent")
    agents, gateways = list(agents), list(gateways)
    for a in agents:
        check_agent_id(a)
    for g in gateways:
        check_gateway_id(g)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    (d / ROOT_FILE).write_text(subjects.root + "\n")
    for user in (*ROLES, *(agent_user(a) for a in agents), *(gateway_user(g) for g in gateways)):
        _write_private(creds_path(d, user), _render(new_identity(user, password=passwords), root))
    return write_authorization(d)


def add_agent(directory: str | Path, agent_id: str, *, password: bool | None = None) -> Path:
    """Write one more agent's identity (the kind of secret the gateway's has, unless told) and
    build ``auth.conf`` again; returns the agent's credentials file."""
    check_agent_id(agent_id)
    return _add(directory, agent_id, agent_user(agent_id), password)


def add_gateway(directory: str | Path, gateway_id: str, *, password: bool | None = None) -> Path:
    """Write one more gateway's identity, for a gateway run with ``--gateway-id``: it reads only
    its own replies. Builds ``auth.conf`` again; returns the credentials file."""
    check_gateway_id(gateway_id)
    return _add(directory, gateway_id, gateway_user(gateway_id), password)


def _add(directory: str | Path, ident: str, user: str, password: bool | None) -> Path:
    d = Path(directory)
    root = read_root(d)
    Subjects(root).agent_work(ident)  # validates the id
    path = creds_path(d, user)
    if path.exists():
        raise AuthDirError(f"{path} exists already")
    if password is None:
        password = bool(read_credentials(creds_path(d, "gateway")).password)
    _write_private(path, _render(new_identity(user, password=password), root))
    write_authorization(d)
    return path


def read_root(directory: str | Path) -> str:
    try:
        return (Path(directory) / ROOT_FILE).read_text().strip()
    except OSError:
        raise AuthDirError(f"{directory} holds no NATS identities: run 'corral auth init' first") from None


def write_authorization(directory: str | Path) -> Path:
    """Build ``auth.conf`` from every credentials file of ``directory``."""
    d = Path(directory)
    subjects = Subjects(read_root(d))
    users = [read_credentials(p) for p in sorted(d.glob(f"*{CREDS_SUFFIX}"))]
    text = authorization(subjects, users)
    _write_private(d / AUTH_FILE, text)
    return d / AUTH_FILE


def authorization(subjects: Subjects, users: Iterable[Credentials]) -> str:
    """The nats-server ``authorization`` block for ``users``: one entry each, with its permissions.
    Anyone else cannot connect. See https://docs.nats.io/running-a-nats-service/configuration/
    securing_nats/authorization."""
    entries = []
    for c in users:
        who = f"nkey: {_q(public_key(c))}" if c.nkey else f"user: {_q(c.user)}, password: {_q(c.password)}"
        perms = _permissions(role_permissions(c.user, subjects))
        entries.append(f"    # {c.user}\n    {{ {who},\n      permissions: {perms} }}")
    return (
        f"# NATS identities of the Corral fleet with root {subjects.root!r}: written by `corral auth`,\n"
        "# built again from the .creds files beside it whenever an agent is added.\n"
        "authorization {\n  users: [\n" + "\n".join(entries) + "\n  ]\n}\n"
    )


def _permissions(p: Permissions) -> str:
    pub = ", ".join(_q(s) for s in p.publish)
    sub = ", ".join(_q(s) for s in p.subscribe)
    allow = "\n        allow_responses: true" if p.allow_responses else ""
    return (
        f"{{\n        publish: {{ allow: [{pub}] }}\n        subscribe: {{ allow: [{sub}] }}{allow}\n      }}"
    )


def _q(s: str) -> str:
    return json.dumps(s)  # a double-quoted string nats-server's config parser reads back as is


def _render(c: Credentials, root: str) -> str:
    return c.render(f"the NATS identity {c.user!r} of the Corral fleet with root {root!r}")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
