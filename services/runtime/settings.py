"""Settings: one frozen Struct per service, built once from ``CORRAL_*`` env vars and CLI flags.

Each setting is declared once, as a field of a settings Struct::

    port: Annotated[int, setting("port to listen on", ge=0, le=65535)] = 11434

The field gives the type (a ``Literal`` for a closed set of values), the default and, through
`setting`, the one-line doc, the constraints (``msgspec.Meta``'s ``ge``, ``gt``, ``le``, ``lt``), any
older flag spellings, whether the value may carry a secret and whether it is a period of the
control plane (``period=True``). From that one declaration come the
environment variable (`env_name`), the command-line flag (`add_arguments`: ``--field-name``, booleans
as ``--flag/--no-flag``), the help text and the README's configuration table (checked by a test).

Nothing else in Corral reads ``os.environ``. Precedence: CLI flag > environment > default.
An invalid value raises `SettingsError`, which names the variable and the flag; only a process's
``main`` turns it into an exit.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import typing
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

ENV_PREFIX = "CORRAL_"

S = TypeVar("S", bound=msgspec.Struct)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class SettingsError(ValueError):
    """A setting has an invalid value; the message names its environment variable and flag."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.env = env_name(field) if field else ""
        self.flag = flag_name(field) if field else ""
        where = f" {self.env} / {self.flag}" if field else ""
        super().__init__(f"invalid setting{where}: {problem}")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def setting(
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    pattern: str | None = None,
    flags: Sequence[str] = (),
    shown: str = "",
    secret: bool = False,
    period: bool = False,
) -> msgspec.Meta:
    """A setting's declaration, for ``Annotated[type, setting(...)]``.

    ``doc`` is the one-line help; ``pattern`` a regular expression a text value must match (the
    whole of it: anchor it); ``flags`` older spellings of the flag that keep working;
    ``shown`` the default in words where the value alone says little (``"detect"``); ``secret``
    marks a URL whose password is masked in ``repr`` and in error messages. ``period`` marks a
    control-plane period: how often something is re-read or re-checked, or how long a fresh state
    counts as under way. A period keeps its meaning on a clock that runs faster (a simulated fleet
    scales it with the clock); a timeout, which detects a failure, is no period.
    """
    bounds: dict[str, Any] = {
        k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern}.items() if v is not None
    }
    extra = {"flags": tuple(flags), "shown": shown, "secret": secret, "period": period}
    meta: msgspec.Meta = msgspec.Meta(**bounds, description=doc, extra=extra)
    return meta


@dataclass(frozen=True)
class Setting:
    """What one field of a settings Struct declares."""

    name: str
    type: Any  # the field's type without its ``Annotated`` metadata
    default: Any
    doc: str = ""
    aliases: tuple[str, ...] = ()
    shown: str = ""
    secret: bool = False
    period: bool = False  # a control-plane period (see `setting`), not a timeout

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def flags(self) -> tuple[str, ...]:
        """Every spelling of the flag: the generated one first, then the older ones."""
        if self.type is bool:
            return (self.flag, "--no-" + self.flag[2:], *self.aliases)
        return (self.flag, *self.aliases)

    @property
    def choices(self) -> tuple[Any, ...]:
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else ()

    @property
    def default_text(self) -> str:
        return self.shown or str(self.default)


@functools.cache
def describe(cls: type[msgspec.Struct]) -> Mapping[str, Setting]:
    """Every field of a settings Struct, in declaration order, as declared."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Setting] = {}
    for f in msgspec.structs.fields(cls):
        tp, metas = hints[f.name], []
        if typing.get_origin(tp) is Annotated:
            tp, *rest = typing.get_args(tp)
            metas = [m for m in rest if isinstance(m, msgspec.Meta)]
        extra: dict[str, Any] = {}
        doc = ""
        for m in metas:
            extra |= m.extra or {}
            doc = m.description or doc
        default = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
        out[f.name] = Setting(
            f.name,
            tp,
            default,
            doc,
            tuple(extra.get("flags", ())),
            extra.get("shown", ""),
            bool(extra.get("secret", False)),
            bool(extra.get("period", False)),
        )
    return MappingProxyType(out)


def mask(url: str) -> str:
    """Hide the credentials in a URL (or comma-separated URLs): ``nats://user:pw@host`` →
    ``nats://user:***@host``; a lone user part may be a token (``nats://token@host`` → ``***@``)."""
    return _USERINFO.sub(lambda m: f"//{m['user']}:***@" if m["password"] is not None else "//***@", url)


_USERINFO = re.compile(r"//(?P<user>[^/@:,]*)(?::(?P<password>[^/@,]*))?@")


def masked_repr(settings: msgspec.Struct) -> str:
    """The Struct's repr with the passwords in its secret settings masked."""
    shown = []
    for s in describe(type(settings)).values():
        value = getattr(settings, s.name)
        if s.secret and isinstance(value, str):
            value = mask(value)
        shown.append(f"{s.name}={value!r}")
    return f"{type(settings).__name__}({', '.join(shown)})"


def load_settings(
    cls: type[S], overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> S:
    """Build ``cls`` from the environment, then ``overrides`` (the flags; ``None`` = not given).

    Raises `SettingsError` for a value of the wrong type or outside its declared range or set.
    """
    env = os.environ if environ is None else environ
    declared = describe(cls)
    values: dict[str, Any] = {}
    for s in declared.values():
        raw = env.get(s.env)
        if raw is not None and raw != "":
            values[s.name] = _from_text(raw, s)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update({k: _canonical(v, declared[k]) if k in declared else v for k, v in given.items()})
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as e:
        name = str(e).rpartition("$.")[2].split(".")[0].split("[")[0].rstrip("`")
        if name not in declared:
            raise SettingsError("", str(e)) from None
        s, shown = declared[name], values.get(name)
        problem = (str(e).rpartition(" - at ")[0] or str(e)).partition(", got ")[0]
        if s.choices:
            problem = "expected one of " + ", ".join(
                repr(c) if c != "" else f"'' ({s.shown})" if s.shown else "''" for c in s.choices
            )
        elif "matching regex" in problem:  # the rule in words, not the expression that checks it
            problem = f"does not fit: {s.doc}"
        if s.secret and isinstance(shown, str):
            shown = mask(shown)
        raise SettingsError(name, f"{problem} (got {shown!r})") from None


def settings_from_args(cls: type[S], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> S:
    """``load_settings`` with the flags that `add_arguments` made and the command line gave."""
    given = {name: getattr(args, name, None) for name in describe(cls)}
    return load_settings(cls, given, environ)


# the common settings a terminal command (`corral ps`, `corral keys`, ...) has no use for: it sends
# no traces, and the registries a pull may reach are the gateway's and the registry's to enforce
SERVICES_ONLY: Final = frozenset({"otlp_endpoint", "allowed_registries"})


def gateway_url(raw: str) -> str:
    """An argparse type for a command's ``--url``: a gateway's HTTP(S) URL, ``http://`` assumed when
    no scheme is given (``127.0.0.1:11434``, as ``OLLAMA_HOST`` is often written)."""
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a gateway URL (http://HOST:PORT)")
    try:
        parts.port  # noqa: B018 -- raises for a port that is not a number
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a gateway URL (http://HOST:PORT)") from None
    return text.rstrip("/")


def described(doc: str) -> str:
    """A module's docstring as a command's ``--help`` text: its reST literals (````x````) plain."""
    return doc.replace("``", "")


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type[msgspec.Struct],
    title: str = "",
    *,
    leave: Collection[str] = (),
) -> None:
    """One flag per setting of ``cls`` (and its older spellings), its doc and default in the help;
    none for the settings named in ``leave`` (`SERVICES_ONLY` for a terminal command).

    Flags left out parse as ``None``, so the environment and then the default apply.
    """
    group = parser.add_argument_group(title or "settings (flag > CORRAL_* environment > default)")
    for s in describe(cls).values():
        if s.name not in leave:
            add_argument(group, s)


def add_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    s: Setting,
    *,
    default: Any = None,
    env: bool = True,
) -> argparse.Action:
    """The flag for one setting. ``default`` and ``env=False`` serve a parser that builds no settings."""
    where = f"; env {s.env}" if env else ""
    help_text = f"{s.doc or s.name} (default: {s.default_text}{where})".replace("%", "%%")
    names = [n for n in s.flags if not (s.type is bool and n.startswith("--no-"))]
    kwargs: dict[str, Any] = {"dest": s.name, "default": default, "help": help_text}
    if s.type is bool:  # argparse adds the --no- spellings
        kwargs["action"] = argparse.BooleanOptionalAction
    elif s.choices:
        kwargs["choices"] = s.choices
        kwargs["type"] = _choice_parser(s)
        kwargs["metavar"] = "{" + ",".join(str(c) for c in s.choices if c != "") + "}"
    elif typing.get_origin(s.type) in (list, tuple):
        kwargs["type"] = _split
        kwargs["metavar"] = "A,B,..."
    else:
        kwargs["type"] = s.type if s.type in (int, float, str) else str
        kwargs["metavar"] = (
            "SECONDS" if s.name.endswith("_s") else "URL" if s.secret else _METAVARS.get(s.type, "VALUE")
        )
    return parser.add_argument(*names, **kwargs)


_METAVARS = {int: "N", float: "NUMBER", str: "TEXT"}


def _split(raw: str) -> list[str]:
    return [p.strip() for p in raw.split(",") if p.strip()]


def _canonical(value: Any, s: Setting) -> Any:
    """A closed set's value as declared, matched without regard to case (``debug`` → ``DEBUG``)."""
    if isinstance(value, str) and s.choices and value not in s.choices:
        matches = [c for c in s.choices if isinstance(c, str) and c.casefold() == value.casefold()]
        if len(matches) == 1:
            return matches[0]
    return value


def _choice_parser(s: Setting) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        return _canonical(raw, s)

    parse.__name__ = s.name  # argparse names the type in its error for a value it cannot convert
    return parse


def _from_text(raw: str, s: Setting) -> Any:
    """Lists and tuples come as comma-separated env values; everything else converts as text."""
    if typing.get_origin(s.type) in (list, tuple):
        return _split(raw)
    return _canonical(raw, s)


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: Annotated[
        str,
        setting(
            "NATS server URL; a cluster's nodes comma-separated (nats://a:4222,nats://b:4222)",
            flags=["--nats"],
            secret=True,
        ),
    ] = "nats://127.0.0.1:4222"
    root: Annotated[
        str, setting("subject root and KV bucket prefix; fleets sharing a NATS use different roots")
    ] = "corral"
    log_level: Annotated[LogLevel, setting("log level")] = "INFO"
    otlp_endpoint: Annotated[
        str, setting("OTLP/HTTP endpoint for traces, e.g. http://localhost:4318", shown="off", secret=True)
    ] = ""
    js_replicas: Annotated[
        int,
        setting("JetStream replicas of every KV bucket and of the queue stream (a NATS cluster)", ge=1, le=5),
    ] = 1
    nats_creds: Annotated[
        str, setting("this process's NATS identity: a credentials file from `corral auth init`", shown="none")
    ] = ""
    nats_tls_ca: Annotated[
        str, setting("CA certificate (PEM) that signed the NATS server's certificate", shown="system CAs")
    ] = ""
    nats_tls_cert: Annotated[
        str, setting("client certificate (PEM) for a NATS server that verifies its clients", shown="none")
    ] = ""
    nats_tls_key: Annotated[str, setting("the private key (PEM) of --nats-tls-cert", shown="none")] = ""
    allowed_registries: Annotated[
        tuple[str, ...],
        setting(
            "registries a pull, push or create may reach (model-name hosts, comma-separated); others: 400",
            shown="registry.ollama.ai,hf.co",
        ),
    ] = ("registry.ollama.ai", "hf.co")

    def __repr__(self) -> str:
        return masked_repr(self)
