"""How a process proves who it is to NATS, and how it reaches NATS over TLS.

A credentials file (``--nats-creds``, written by ``corral auth init``) names one identity::

    # the NATS identity 'gateway' of root 'corral'
    user: gateway
    inbox: _INBOX_gateway
    nkey: SUA...             (or  password: ...)

``nkey`` is the seed of an nkey (https://docs.nats.io/running-a-nats-service/configuration/
securing_nats/auth_intro/nkey_auth); the server knows only its public key. ``inbox`` is the prefix of
this identity's reply subjects: the server lets each identity subscribe only to its own, so no
identity can read the answers to another's requests. A NATS ``.creds`` file (a user JWT and its
seed, for servers run in operator mode) is passed to nats-py as it is.

TLS (``--nats-tls-ca``, ``--nats-tls-cert``, ``--nats-tls-key``): the CA that signed the server's
certificate, and this process's own certificate for a server that verifies its clients. Either
turns TLS on; a ``tls://`` URL without them uses the system's CAs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.runtime.settings import CommonSettings

_JWT_MARK = "-----BEGIN NATS USER JWT-----"
_KEYS = frozenset({"user", "inbox", "nkey", "password"})


class CredentialsError(ValueError):
    """A credentials file that cannot be read or says something it should not."""


@dataclass(frozen=True, repr=False)
class Credentials:
    """One identity: its user name, the prefix of its reply subjects, and its secret."""

    user: str
    inbox: str
    nkey: str = ""  # the seed (``SU...``)
    password: str = ""

    def __repr__(self) -> str:  # never the secret
        return f"Credentials(user={self.user!r}, inbox={self.inbox!r})"

    def render(self, comment: str = "") -> str:
        """The file's text: what `read_credentials` reads back."""
        secret = f"nkey: {self.nkey}" if self.nkey else f"password: {self.password}"
        head = f"# {comment}\n" if comment else ""
        return f"{head}user: {self.user}\ninbox: {self.inbox}\n{secret}\n"


def parse_credentials(text: str, *, where: str = "credentials") -> Credentials:
    fields: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS or not value:
            raise CredentialsError(f"{where}:{n}: expected one of {sorted(_KEYS)} as 'key: value'")
        fields[key] = value
    if "user" not in fields or ("nkey" in fields) == ("password" in fields):
        raise CredentialsError(f"{where}: needs 'user' and exactly one of 'nkey' or 'password'")
    if "nkey" in fields and not fields["nkey"].startswith("SU"):
        raise CredentialsError(f"{where}: 'nkey' must be a user seed (SU...)")
    inbox = fields.get("inbox", "_INBOX")
    if not inbox.isascii() or any(c in inbox for c in " .*>") or not inbox:
        raise CredentialsError(f"{where}: 'inbox' must be one subject token")
    return Credentials(fields["user"], inbox, fields.get("nkey", ""), fields.get("password", ""))


def read_credentials(path: str | Path) -> Credentials:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CredentialsError(f"cannot read NATS credentials {path}: {e.strerror}") from None
    return parse_credentials(text, where=str(path))


@dataclass(frozen=True)
class NatsAuth:
    """What `corral.runtime.nats.connect` needs beside the URL: file paths, read when connecting."""

    creds: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @classmethod
    def of(cls, settings: CommonSettings) -> NatsAuth:
        return cls(settings.nats_creds, settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)

    def options(self) -> dict[str, Any]:
        """nats-py ``connect`` keyword arguments for this identity and TLS."""
        out: dict[str, Any] = {}
        if self.creds:
            if _JWT_MARK in _head(self.creds):
                out["user_credentials"] = self.creds
            else:
                c = read_credentials(self.creds)
                out["inbox_prefix"] = c.inbox
                if c.nkey:
                    out["nkeys_seed_str"] = c.nkey
                else:
                    out["user"], out["password"] = c.user, c.password
        if self.tls_ca or self.tls_cert or self.tls_key:
            out["tls"] = self.tls_context()
        return out

    def tls_context(self) -> ssl.SSLContext:
        """A client context that trusts ``tls_ca`` (else the system's CAs) and presents
        ``tls_cert`` when one is given."""
        if self.tls_key and not self.tls_cert:
            raise CredentialsError("--nats-tls-key needs --nats-tls-cert")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
        except (OSError, ssl.SSLError) as e:
            raise CredentialsError(f"cannot load NATS TLS files: {e}") from None
        return ctx


def _head(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(256)
    except OSError as e:
        raise CredentialsError(f"cannot read NATS credentials {path}: {e.strerror}") from None
