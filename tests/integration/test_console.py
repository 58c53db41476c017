"""The web console in a real browser: Debian's Chromium, headless, driven by Playwright
(pytest-playwright's fixtures, launched with the system binary: Playwright's own browser download is
not used). Against a real ``corral up --sim 3`` process: the page lists its agents with their GPUs, a
playground chat opened from the keyboard streams text and names its agent, a drain confirmed in the
page's dialog shows the agent draining (and an uncordon brings it back), the browser logs no error,
and a gateway that goes away is said to be unreachable.

Screenshots go to the test's temporary folder; with ``CORRAL_UPDATE_SCREENSHOTS=1`` they replace
``docs/console.png`` and ``docs/playground.png``, which the README shows.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Route, expect, sync_playwright

from tests.integration.cli_helpers import without_corral_settings
from tests.integration.corral_up import CorralUp

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_MS = 15_000  # every wait in the page is bounded by this

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="NO CHROMIUM: the console's browser tests did not run. `scripts/test` installs Debian's "
        "`chromium` when it runs as root with apt-get; elsewhere install it (apt-get install chromium).",
    ),
]


@dataclass
class Up:
    """A running ``corral up``: its process, gateway URL and agent ids, as it printed them."""

    proc: subprocess.Popen[bytes]
    reader: threading.Thread
    url: str = ""
    agents: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # as Ctrl-C: a clean drain
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            raise
        finally:
            self.reader.join(timeout)  # it has read to the end of the output
            assert self.proc.stdout is not None
            self.proc.stdout.close()


def start_up(log: Path, sims: int, timeout: float = 60.0) -> Up:
    """``corral up --sim N`` on free ports, its own embedded NATS; returns once it printed its gateway.
    Its stdout is read to the end by a thread, so it never blocks on a full pipe."""
    env = without_corral_settings()
    args = ["--sim", str(sims), "--port", "0", "--nats-port", "0", "--time-scale", "0.05"]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli", "up", *args], stdout=subprocess.PIPE, stderr=err, env=env
        )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode())
        lines.put("")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    up = Up(proc, reader)
    deadline = time.monotonic() + timeout
    banner = CorralUp()
    while not banner.url:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            up.stop()
            raise TimeoutError("corral up printed no gateway:\n" + "".join(banner.printed)) from None
        if not line:
            up.stop()
            raise RuntimeError(f"corral up ended:\n{''.join(banner.printed)}\n{log.read_text()[-3000:]}")
        banner.take(line)
    up.url, up.agents = banner.url, list(banner.backends)
    return up


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """pytest-playwright's, for this module only: while a sync Playwright runs, its thread counts as
    running an event loop, which the asyncio tests after this module cannot share."""
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright, browser_type_launch_args: dict[str, Any]) -> Iterator[Browser]:
    """The browser pytest-playwright's contexts and pages open in, closed with the module."""
    chromium = playwright.chromium.launch(**browser_type_launch_args)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def browser_context_args() -> dict[str, Any]:
    """In place of pytest-playwright's (which needs its session-long Playwright for devices)."""
    return {"viewport": {"width": 1280, "height": 800}}


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright's Chromium is the system's, headless."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "headless": True}


@pytest.fixture(scope="session")
def base_url() -> str | None:
    """In place of pytest-base-url's (which pytest now warns about); the tests give whole URLs."""
    return None


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    fleet = start_up(tmp_path_factory.mktemp("console") / "corral-up.log", sims=3)
    try:
        yield fleet
    finally:
        assert fleet.stop() == 0


@pytest.fixture
def errors(page: Page) -> list[str]:
    """What the page logs as an error, and every uncaught exception in it."""
    seen: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            seen.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda e: seen.append(f"pageerror: {e}"))
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    return seen


def screenshot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("CORRAL_UPDATE_SCREENSHOTS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(path, ROOT / "docs" / name)


def agent_row(page: Page, agent: str) -> Any:
    return page.locator(f'#agents tr[data-agent="{agent}"]')


def test_the_console_lists_the_fleet(page: Page, errors: list[str], up: Up) -> None:
    assert len(up.agents) == 3
    page.goto(up.url + "/console")
    for agent in up.agents:
        row = agent_row(page, agent)
        expect(row).to_be_visible()
        expect(row.locator(".status")).to_have_text("active")
        expect(row.get_by_role("meter")).to_have_count(1)  # one simulated GPU each, its VRAM as a bar
    expect(page.locator("#totals")).to_contain_text("3 agents (3 active), 3 GPUs")
    expect(page.locator("#whoami")).to_have_text("API keys off")
    expect(page.locator("#unreachable")).to_be_hidden()
    assert errors == []


def test_a_playground_chat_from_the_keyboard_streams_and_names_its_agent(
    page: Page, errors: list[str], up: Up, tmp_path: Path
) -> None:
    page.goto(up.url + "/console")
    expect(agent_row(page, up.agents[0])).to_be_visible()
    expect(page.locator("#chat-model option")).not_to_have_count(0)
    for _ in range(10):  # the Playground tab is reached with Tab alone
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "tab-playground":
            break
    assert page.evaluate("document.activeElement.id") == "tab-playground"
    page.keyboard.press("Enter")
    expect(page.locator("#panel-playground")).to_be_visible()
    expect(page.locator("#chat-prompt")).to_be_focused()
    # the first model by name, all-minilm, only embeds: the first that chats is picked
    expect(page.locator("#chat-model")).to_have_value("llama3.2:latest")
    page.locator("#chat-prompt").fill("Why is the sky blue?")
    page.locator("#chat-prompt").press("Control+Enter")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("aria-busy", "true")  # streaming, not yet done
    expect(answer).not_to_have_attribute("aria-busy", "true")
    assert len(answer.inner_text()) > 20 and "error" not in answer.get_attribute("class")  # type: ignore[operator]
    served = page.locator("#chat-agent").inner_text()
    assert served in up.agents, f"the page names no agent of the fleet: {served!r}"
    expect(page.locator(".msg-meta").last).to_contain_text(f"served by {served}")
    expect(page.locator("#chat-ttft")).to_have_text(re.compile(r"^\d+ ms$"))
    expect(page.locator("#chat-route")).not_to_have_text("…")
    screenshot(page, tmp_path, "playground.png")
    assert errors == []


def test_a_gateway_cut_off_from_nats_is_said_so_and_a_failed_poll_clears_once_over(
    page: Page, errors: list[str], up: Up
) -> None:
    """The gateway's own answers, changed on their way to the page: the first poll refused (as a
    key's rate limit would), the next two from a gateway that has lost NATS, then as they are."""
    polls = 0

    def status(route: Route) -> None:
        nonlocal polls
        polls += 1
        if polls == 1:
            route.fulfill(status=429, json={"error": "rate limit exceeded: 10 requests per minute"})
            return
        answer = route.fetch()
        body = answer.json()
        if polls <= 3:
            body["nats_away_s"] = 13.2
        route.fulfill(response=answer, json=body)

    page.route("**/api/status", status)
    page.goto(up.url + "/console")
    expect(page.locator("#notice")).to_contain_text("/api/status: rate limit exceeded")
    away = page.locator("#nats-away")
    expect(away).to_be_visible()
    expect(away).to_contain_text("cut off from NATS for 13 s")
    expect(page.locator("#notice")).to_be_hidden()  # the poll after the refused one cleared it
    expect(away).to_be_hidden()
    expect(agent_row(page, up.agents[0])).to_be_visible()
    assert not [e for e in errors if e.startswith("pageerror")], errors


def test_a_drain_confirmed_in_the_page_shows_the_agent_draining(
    page: Page, errors: list[str], up: Up, tmp_path: Path
) -> None:
    agent = up.agents[1]
    page.goto(up.url + "/console")
    row = agent_row(page, agent)
    expect(row.locator(".status")).to_have_text("active")
    row.get_by_role("button", name=f"drain {agent}").click()
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(f"Drain agent {agent}?")
    expect(page.locator("#confirm-cancel")).to_be_focused()  # the safe choice has the focus
    page.locator("#confirm-ok").click()
    expect(row.locator(".status")).to_have_text("draining")
    expect(page.locator("#notice")).to_have_text(f"{agent} is draining.")
    expect(row.get_by_role("button", name=f"uncordon {agent}")).to_be_enabled()
    expect(page.locator("#totals")).to_contain_text("3 agents (2 active)")
    screenshot(page, tmp_path, "console.png")
    # cancelling does nothing; confirming an uncordon brings it back
    row.get_by_role("button", name=f"uncordon {agent}").click()
    page.locator("#confirm-cancel").click()
    expect(dialog).to_be_hidden()
    expect(row.locator(".status")).to_have_text("draining")
    row.get_by_role("button", name=f"uncordon {agent}").click()
    page.locator("#confirm-ok").click()
    expect(row.locator(".status")).to_have_text("active")
    assert errors == []


class _Blank(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<!doctype html><title>app</title>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def blank_page(address: str) -> Iterator[str]:
    """A server of an empty page on ``address`` (a loopback one: the browser lets loopback pages
    call the loopback gateway), on a free port; its origin."""
    server = http.server.ThreadingHTTPServer((address, 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT_MS / 1000)


def test_a_page_of_an_allowed_origin_streams_a_chat_and_one_of_another_is_refused(page: Page, up: Up) -> None:
    """Pages of two other origins calling the gateway from the browser: ``http://127.0.0.1:<port>``
    is one of Ollama's default origins, so its preflighted streaming chat is served with CORS
    headers; ``http://127.0.0.2:<port>`` is not, so the browser gets the gateway's 403 without CORS
    headers and its fetch fails."""
    page.set_default_timeout(WAIT_MS)
    with blank_page("127.0.0.1") as allowed, blank_page("127.0.0.2") as other:
        page.goto(allowed + "/")
        got = page.evaluate(
            """async (url) => {
                const tags = await (await fetch(url + '/api/tags')).json();
                const r = await fetch(url + '/api/chat', {  // JSON: a preflighted request
                    method: 'POST',
                    headers: {'Content-Type': 'application/json'},
                    body: JSON.stringify({model: tags.models[0].name, stream: true,
                                          messages: [{role: 'user', content: 'hi'}]}),
                });
                const lines = (await r.text()).trim().split('\\n').map(JSON.parse);
                return {status: r.status, lines: lines.length, done: lines[lines.length - 1].done};
            }""",
            up.url,
        )
        # read at all only because the gateway named this origin in its CORS headers
        assert got["status"] == 200 and got["done"] is True and got["lines"] > 1
        page.goto(other + "/")
        refused = page.evaluate(
            "async (url) => { try { await fetch(url + '/api/tags'); return 'served'; }"
            " catch (e) { return e.name; } }",
            up.url,
        )
        assert refused == "TypeError"  # the browser's "Failed to fetch": no CORS headers on the 403


def test_a_gateway_that_goes_away_is_said_to_be_unreachable(
    page: Page, errors: list[str], tmp_path: Path
) -> None:
    fleet = start_up(tmp_path / "corral-up.log", sims=1)
    try:
        page.goto(fleet.url + "/console")
        expect(agent_row(page, fleet.agents[0])).to_be_visible()
        expect(page.locator("#unreachable")).to_be_hidden()
        assert errors == []
    finally:
        assert fleet.stop() == 0
    banner = page.locator("#unreachable")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Gateway unreachable.")
    # what the browser logs now is its own note of the failed requests, and no exception of the page
    assert not [e for e in errors if e.startswith("pageerror")], errors
    assert all("Failed to load resource" in e or "ERR_" in e for e in errors), errors
