"""``corral batch``: the gateway's OpenAI Batch API from the command line, over HTTP.

    corral batch submit FILE [--model M] [--endpoint E] [--completion-window 24h] [--wait]
    corral batch status ID
    corral batch results ID [-o FILE]
    corral batch cancel ID
    corral batch list

FILE is an OpenAI batch file (JSONL, one ``{"custom_id", "method", "url", "body"}`` per line); a line
that is a bare request body (none of those keys) is taken as one too, with custom_id ``line-N`` (its
line number) and the ``--endpoint``; ``--model`` fills every body that names no model. Every command takes ``--url`` (the
gateway, default ``http://127.0.0.1:11434``) and ``--api-key`` (with ``CORRAL_AUTH=keys``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from corral.gateway.batch.model import window_seconds
from corral.runtime.settings import described, gateway_url

DEFAULT_URL = "http://127.0.0.1:11434"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# a line with any of these is a batch line (the gateway names what it lacks), else a bare body
BATCH_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
POLL_S = 1.0  # how often --wait asks the gateway how the batch is doing
BAR_WIDTH = 30
TIMEOUT_S = 60.0


class Failed(Exception):
    """The gateway refused a call (its message), or could not be reached."""


class Api:
    def __init__(self, url: str, api_key: str) -> None:
        self.base = url.rstrip("/") + "/v1"
        self.api_key = api_key

    def call(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> bytes:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise Failed(f"{method} {path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise Failed(f"cannot reach the gateway at {self.base}: {e}") from None

    def json(self, method: str, path: str, value: Any = None) -> Any:
        body = None if value is None else json.dumps(value).encode()
        return json.loads(self.call(method, path, body))

    def upload(self, name: str, data: bytes) -> Any:
        boundary = "corral" + secrets.token_hex(12)
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'.encode(),
            b"Content-Type: application/jsonl\r\n\r\n",
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
        return json.loads(
            self.call("POST", "/files", b"".join(parts), f"multipart/form-data; boundary={boundary}")
        )


def batch_file(text: str, endpoint: str, model: str | None) -> bytes:
    """FILE as an OpenAI batch file: bare request bodies wrapped, ``model`` filled in where missing."""
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            out.append(raw)  # the gateway names the line in its validation errors
            continue
        if isinstance(item, dict) and not BATCH_LINE_KEYS & item.keys():  # a bare body
            item = {"custom_id": f"line-{number}", "method": "POST", "url": endpoint, "body": item}
        if model and isinstance(item, dict) and isinstance(item.get("body"), dict):
            item["body"].setdefault("model", model)
        out.append(json.dumps(item))
    return ("\n".join(out) + "\n").encode()


def describe(b: dict[str, Any]) -> str:
    counts = b.get("request_counts") or {}
    done = counts.get("completed", 0) + counts.get("failed", 0)
    text = (
        f"{b['id']}  {b['status']:<11} {done}/{counts.get('total', 0)} done, {counts.get('failed', 0)} failed"
    )
    if b.get("model"):
        text += f", {b['model']}"
    if usage := b.get("usage"):
        text += f", {usage.get('input_tokens', 0):,} tokens in, {usage.get('output_tokens', 0):,} out"
    for e in ((b.get("errors") or {}).get("data") or [])[:20]:
        text += f"\n  line {e.get('line')}: {e.get('code')}: {e.get('message')}"
    return text


def _bar(b: dict[str, Any]) -> str:
    counts = b.get("request_counts") or {}
    total = counts.get("total", 0)
    done = counts.get("completed", 0) + counts.get("failed", 0)
    filled = BAR_WIDTH * done // total if total else 0
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} {b['status']}"


def wait(api: Api, batch_id: str) -> dict[str, Any]:
    """Follow the batch until it ends: a bar redrawn in place on a terminal, a line per change
    otherwise."""
    tty = sys.stderr.isatty()
    shown = ""
    while True:
        b = api.json("GET", f"/batches/{batch_id}")
        line = _bar(b)
        if line != shown:
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            shown = line
        if b["status"] in FINAL:
            if tty:
                print(file=sys.stderr)
            return dict(b)
        time.sleep(POLL_S)  # the API has no push: a client asks again, as OpenAI's docs do


def results(api: Api, b: dict[str, Any]) -> bytes:
    """The batch's output lines, then its error lines."""
    out = b""
    for key in ("output_file_id", "error_file_id"):
        if b.get(key):
            out += api.call("GET", f"/files/{b[key]}/content")
    return out


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", type=gateway_url, default=DEFAULT_URL, help=f"the gateway (default {DEFAULT_URL})"
    )
    common.add_argument("--api-key", default="", help="an API key (with CORRAL_AUTH=keys)")
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="corral batch", description=described(__doc__.split("\n\n")[0])
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", parents=[common], allow_abbrev=False, help="upload FILE and start a batch")
    s.add_argument("file", type=Path)
    s.add_argument("--model", help="the model of every request that names none")
    s.add_argument(
        "--endpoint",
        default=ENDPOINTS[0],
        choices=ENDPOINTS,
        help=f"the batch's endpoint, and the url of its bare bodies (default {ENDPOINTS[0]})",
    )
    s.add_argument(
        "--completion-window",
        type=_window,
        default="24h",
        metavar="DURATION",
        help="how long it may run before what is left expires: 24h, 90m, 600s (default 24h)",
    )
    s.add_argument("--wait", action="store_true", help="follow it until it ends, with a progress bar")
    for name, text in (("status", "how a batch is doing"), ("cancel", "cancel a batch")):
        sub.add_parser(name, parents=[common], allow_abbrev=False, help=text).add_argument("id")
    r = sub.add_parser(
        "results", parents=[common], allow_abbrev=False, help="a finished batch's output and error lines"
    )
    r.add_argument("id")
    r.add_argument("-o", "--output", type=Path, help="write them here (default: standard output)")
    sub.add_parser("list", parents=[common], allow_abbrev=False, help="the batches, newest first")
    return p


def _window(raw: str) -> str:
    """A completion window the gateway takes, checked before the file is uploaded (else it would be
    left there, with no batch)."""
    try:
        window_seconds(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return raw


def run(args: argparse.Namespace) -> int:
    api = Api(args.url, args.api_key)
    if args.command == "submit":
        data = batch_file(args.file.read_text(), args.endpoint, args.model)
        f = api.upload(args.file.name, data)
        b = api.json(
            "POST",
            "/batches",
            {
                "input_file_id": f["id"],
                "endpoint": args.endpoint,
                "completion_window": args.completion_window,
            },
        )
        print(b["id"])
        if args.wait:
            b = wait(api, b["id"])
        if b["status"] in FINAL:
            print(describe(b), file=sys.stderr)
        return 0 if b["status"] not in ("failed", "expired", "cancelled") else 1
    if args.command == "status":
        print(describe(api.json("GET", f"/batches/{args.id}")))
    elif args.command == "cancel":
        print(describe(api.json("POST", f"/batches/{args.id}/cancel")))
    elif args.command == "results":
        b = api.json("GET", f"/batches/{args.id}")
        if b["status"] not in FINAL:
            raise Failed(f"batch {args.id} is {b['status']}: its results are not written yet")
        out = results(api, b)
        if args.output is not None:
            args.output.write_bytes(out)
        else:
            sys.stdout.write(out.decode())
    else:
        after = ""
        while True:
            page = api.json("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            for b in page["data"]:
                print(describe(b))
            if not page["has_more"]:
                break
            after = page["last_id"]
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except Failed as e:
        print(f"corral batch: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # FILE unreadable, -o not writable
        print(f"corral batch: {e}", file=sys.stderr)
        return 2
