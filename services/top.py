"""``corral top``: a live terminal view of the fleet (agents, GPUs, VRAM, slots, queue, requests/s,
tokens/s, TTFT), redrawn in place with ANSI escapes, for people on an SSH session.

It reads the gateway's ``GET /api/status`` over HTTP, not NATS: one URL is all it needs (the same
one Ollama clients use), it works from wherever the gateway is reachable without a NATS identity,
and with API keys on it sees what its key may see (``--key`` or ``--key-file``; any role will do).
``--once`` prints one frame without escapes (for scripts and tests); into a pipe or a file it prints
plain frames, one per ``--interval``.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
from corral.runtime.settings import gateway_url
from corral.views.terminal import printable

GIB = 2**30
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
BAR = 12  # characters of a VRAM bar


# What top reads of /api/status (`corral.views.FleetStatus`); lenient, since a user key's view has
# no backend addresses and an older gateway may lack newer fields.
class Gpu(msgspec.Struct):
    name: str = ""
    vram_total: int = 0
    vram_free: int = 0


class Loaded(msgspec.Struct):
    model: str = ""
    context_length: int = 0


class Agent(msgspec.Struct):
    id: str = ""
    vendor: str = ""
    status: str = ""
    gpus: list[Gpu] = msgspec.field(default_factory=list)
    loaded: list[Loaded] = msgspec.field(default_factory=list)
    parallel: int = 0
    slots: int = 0  # parallel per loaded or busy model (older gateways: absent)
    in_flight: int = 0
    queued: int = 0


class Totals(msgspec.Struct):
    agents: int = 0
    active: int = 0
    gpus: int = 0
    vram_total: int = 0
    vram_free: int = 0
    loaded: int = 0
    in_flight: int = 0
    queued: int = 0


class Rates(msgspec.Struct):
    window_s: float = 0.0
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    ttft_ms_p50: float | None = None
    ttft_ms_p95: float | None = None


class Status(msgspec.Struct):
    totals: Totals = msgspec.field(default_factory=Totals)
    agents: list[Agent] = msgspec.field(default_factory=list)
    rates: Rates | None = None
    queue: dict[str, int] = msgspec.field(default_factory=dict)
    nats_away_s: float | None = None  # the gateway is cut off from NATS (older gateways: absent)


_decoder = msgspec.json.Decoder(Status)
_error_decoder = msgspec.json.Decoder(dict[str, object])


class Unavailable(Exception):
    """The gateway could not be read; the message says why, for a person."""


def fetch(url: str, key: str | None, timeout: float = 5.0) -> Status:
    request = urllib.request.Request(url.rstrip("/") + "/api/status")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body: bytes = r.read()
    except urllib.error.HTTPError as e:
        with e:
            try:
                detail = str(_error_decoder.decode(e.read()).get("error", e.reason))
            except msgspec.DecodeError:
                detail = str(e.reason)
        hint = " (give an API key: --key or --key-file)" if e.code == 401 else ""
        raise Unavailable(f"the gateway answered {e.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise Unavailable(f"gateway unreachable at {url}: {reason}") from None
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise Unavailable(f"{url}/api/status is not Corral's fleet status: {e}") from None


def _gb(n: int) -> str:
    return f"{n / GIB:.1f}"


def _bar(used: int, total: int) -> str:
    filled = round(BAR * used / total) if total else 0
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n or "-")


def render(status: Status, url: str, now: datetime.datetime, width: int = 120) -> list[str]:
    """One frame, as lines no wider than ``width``."""
    t = status.totals
    head = [
        f"corral top  {url}  {now:%H:%M:%S}",
        f"{t.agents} agents ({t.active} active)  {t.gpus} GPUs  VRAM {_gb(t.vram_total - t.vram_free)}"
        f"/{_gb(t.vram_total)} GiB  {t.loaded} loaded  {t.in_flight} running  {t.queued} queued",
    ]
    if status.nats_away_s is not None:
        head.insert(
            1,
            f"NATS LOST: the gateway has been cut off from NATS for {status.nats_away_s:.0f} s; "
            "below is the fleet as it last saw it, and model requests fail",
        )
    r = status.rates
    if r is None:
        head.append(
            "rates: none while cut off from NATS"
            if status.nats_away_s is not None
            else "rates: no aggregator is running"
        )
    else:
        head.append(
            f"last {r.window_s:.0f} s: {r.requests_per_s:.2f} req/s  {r.tokens_per_s:.1f} tokens/s  "
            f"TTFT p50 {_ms(r.ttft_ms_p50)}  p95 {_ms(r.ttft_ms_p95)}"
        )
    waiting = "  ".join(f"{m} {n}" for m, n in status.queue.items())
    head.append(f"fleet queue: {waiting or 'empty'}")
    header = ("AGENT", "VENDOR", "STATUS", "GPU", "VRAM GiB", "SLOTS", "QUEUED", "LOADED")
    rows: list[tuple[str, ...]] = []
    for a in status.agents:
        loaded = ", ".join(f"{m.model} ({_ctx(m.context_length)})" for m in a.loaded) or "-"
        slots = f"{a.in_flight}/{a.slots or a.parallel}"
        gpus = a.gpus or [Gpu(name="no GPU")]
        for i, g in enumerate(gpus):
            used = g.vram_total - g.vram_free
            vram = f"{_bar(used, g.vram_total)} {_gb(used)}/{_gb(g.vram_total)}" if g.vram_total else "-"
            if i == 0:
                rows.append((a.id, a.vendor, a.status, g.name, vram, slots, str(a.queued), loaded))
            else:
                rows.append(("", "", "", g.name, vram, "", "", ""))
    table = [header, *[tuple(map(printable, r)) for r in rows]]  # agents wrote them: no escapes through
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return [line[:width] for line in [*head, "", *lines]]


def frame(lines: list[str]) -> str:
    """Lines drawn over the previous frame: home, each line cleared to its end, the rest cleared."""
    return HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral top",
        description="A live view of the fleet, read from a gateway's /api/status and redrawn in place.",
    )
    p.add_argument(
        "--url", type=gateway_url, default="http://127.0.0.1:11434", help="the gateway (default %(default)s)"
    )
    p.add_argument("--key", help="an API key, when the gateway has keys on (any role)")
    p.add_argument("--key-file", type=Path, help="a file holding the API key (kept out of `ps`)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default %(default)s)")
    p.add_argument("--once", action="store_true", help="print one frame, without escapes, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.interval <= 0:
        sys.stderr.write("corral top: --interval must be above 0\n")
        return 2
    key: str | None = args.key
    if args.key_file is not None:
        try:
            key = args.key_file.read_text().strip()
        except OSError as e:
            sys.stderr.write(f"corral top: cannot read --key-file: {e}\n")
            return 2
    if args.once:
        try:
            status = fetch(args.url, key)
        except Unavailable as e:
            sys.stderr.write(f"corral top: {e}\n")
            return 1
        sys.stdout.write("\n".join(render(status, args.url, datetime.datetime.now())) + "\n")
        return 0
    return _live(args.url, key, args.interval)


def _live(url: str, key: str | None, interval: float) -> int:
    """Frames redrawn in place on a terminal; into a pipe or a file (``corral top > log``), plain
    frames one after another, a blank line between them, as ``top -b`` writes them."""
    out = sys.stdout
    tty = out.isatty()
    try:
        if tty:
            out.write(HIDE_CURSOR + "\x1b[2J")
        while True:
            width = _columns()
            try:
                lines = render(
                    fetch(url, key, timeout=min(5.0, interval + 1)), url, datetime.datetime.now(), width
                )
            except Unavailable as e:
                lines = [f"corral top  {url}  {datetime.datetime.now():%H:%M:%S}", "", str(e), "retrying…"]
            if tty:
                out.write(frame([*lines, "", f"every {interval:g} s; Ctrl-C quits"]))
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            time.sleep(interval)  # the refresh period, not a wait for anything
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write(SHOW_CURSOR + "\n")
            out.flush()


def _columns() -> int:
    return shutil.get_terminal_size((120, 40)).columns
