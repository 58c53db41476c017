"""What Corral adds on top of one Ollama: the simulator directly, through Corral, through nginx.

    .venv/bin/python -m bench.overhead [--quick] [--json out.json]

Starts, each as its own OS process: an embedded nats-server (``corral nats``), one simulator with
no delays (``corral sim``, 64 parallel slots, 500-token replies), one agent for it (``corral
agent --parallel 64``), the gateway (``corral gateway``) and, when it can be installed, nginx as a
plain keep-alive reverse proxy to the simulator. Then, phase by phase and target by target in the
same run, a closed-loop load generator (this process, uvloop + httptools, one keep-alive
connection per concurrent request) measures:

* non-streaming ``/api/generate`` (num_predict 4) at concurrency 1 and 64: req/s and latency;
* streaming with num_predict 8 at concurrency 1: time to first token (first body byte);
* 64 concurrent streams of 500 tokens: streamed chunks/s, where a chunk is one NDJSON line as
  the simulator wrote it (counted at the client, however the proxy coalesced them);
* CPU of the proxy processes (gateway + agent + nats-server for Corral, master + worker for
  nginx) from /proc/<pid>/stat before and after each phase, per request and per chunk. The
  simulator and the load generator are not counted; their CPU is listed separately.

Figures are compared with Corral's performance budgets (`BUDGETS` below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench.common import (
    Child,
    Phase,
    closed_loop,
    cpu_seconds,
    fetch,
    fmt,
    free_port,
    get,
    loop_name,
    machine,
    post,
    run,
    table,
    tree_cpu_seconds,
    wait_port,
    write_json,
)

HOST = "127.0.0.1"
MODEL = "llama3.2"
STREAM_TOKENS = 500
SIM_TOML = f"""\
# bench.overhead: no delays, enough slots and VRAM for 64 concurrent requests, 500-token replies
time_scale = 0
num_parallel = 64
max_queue = 4096
reply_tokens = [{STREAM_TOKENS}, {STREAM_TOKENS}]
context_length = 2048
gpus = [{{ name = "bench", vram_gb = 80 }}]
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream sim {{
        server 127.0.0.1:{sim_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


# -- what is measured ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    what: str
    body: dict[str, Any]
    concurrency: int
    requests: int
    time_cap: float


def specs(quick: bool) -> list[Spec]:
    short = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
    ttft = {"model": MODEL, "prompt": "hi", "stream": True, "options": {"num_predict": 8}}
    long = {"model": MODEL, "prompt": "hi", "stream": True, "options": {"num_predict": STREAM_TOKENS}}
    if quick:
        return [
            Spec("c1", "non-streaming, concurrency 1", short, 1, 300, 2.0),
            Spec("c64", "non-streaming, concurrency 64", short, 64, 3000, 2.0),
            Spec("ttft", "streaming 8 tokens, concurrency 1", ttft, 1, 150, 1.5),
            Spec("stream", f"64 streams x {STREAM_TOKENS} tokens", long, 64, 64, 4.0),
        ]
    return [
        Spec("c1", "non-streaming, concurrency 1", short, 1, 3000, 15.0),
        Spec("c64", "non-streaming, concurrency 64", short, 64, 20000, 15.0),
        Spec("ttft", "streaming 8 tokens, concurrency 1", ttft, 1, 1500, 10.0),
        Spec("stream", f"64 streams x {STREAM_TOKENS} tokens", long, 64, 384, 30.0),
    ]


@dataclass
class Target:
    name: str
    port: int
    proxy: list[Child]  # the processes whose CPU is the cost of this target (none for direct)


@dataclass
class Run:
    phase: Phase
    cpu: dict[str, float]  # process name → CPU seconds during the phase


# -- the fleet -------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.children: dict[str, Child] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.corral = str(Path(sys.executable).with_name("corral"))
        self.nginx_note = ""

    def child(self, name: str, argv: list[str]) -> Child:
        c = Child(name, argv, log_path=self.dir / f"{name}.log", env=self.env)
        self.children[name] = c
        return c

    async def start(self) -> list[Target]:
        nats_port, sim_port, gw_port = free_port(), free_port(), free_port()
        nats_url = f"nats://{HOST}:{nats_port}"
        (self.dir / "sim.toml").write_text(SIM_TOML)
        lvl = ["--log-level", "WARNING"]

        nats = self.child(
            "nats-server",
            [self.corral, "nats", "--port", str(nats_port), "--store-dir", str(self.dir / "nats"), *lvl],
        )
        sim = self.child(
            "simulator",
            [self.corral, "sim", "--config", str(self.dir / "sim.toml"), "--port", str(sim_port), *lvl],
        )
        await asyncio.gather(nats.start(), sim.start())
        await asyncio.gather(wait_port(nats_port, nats, 30), wait_port(sim_port, sim, 30))
        # load the model before the agent starts, so its first look at the simulator sees it loaded
        status, body = await fetch(
            HOST, sim_port, post(HOST, sim_port, "/api/generate", _json({"model": MODEL, "prompt": ""}))
        )
        if status != 200:
            raise RuntimeError(f"preloading {MODEL} on the simulator: {status} {body[:200]!r}")

        agent = self.child(
            "agent",
            [
                self.corral, "agent", "--ollama", f"http://{HOST}:{sim_port}", "--nats", nats_url,
                "--parallel", "64", "--id", "a0", "--vendor", "nvidia", "--vram-gb", "80", *lvl,
            ],
        )  # fmt: skip
        gateway = self.child(
            "gateway", [self.corral, "gateway", "--port", str(gw_port), "--nats", nats_url, *lvl]
        )
        await agent.start()
        await gateway.start()
        await wait_port(gw_port, gateway, 30)
        await self._wait_fleet(gw_port, agent, 30)

        targets = [Target("direct", sim_port, []), Target("corral", gw_port, [gateway, agent, nats])]
        nginx = await self._start_nginx(sim_port)
        if nginx is not None:
            targets.append(nginx)
        return targets

    async def _wait_fleet(self, port: int, agent: Child, timeout: float) -> None:
        """Until the gateway lists the agent's loaded model and answers a request through it."""
        deadline = time.monotonic() + timeout
        probe = post(HOST, port, "/api/generate", _json(specs(True)[0].body))
        last = ""
        while time.monotonic() < deadline:
            if not agent.alive():
                raise RuntimeError(f"agent exited during start:\n{agent.log_tail()}")
            status, body = await fetch(HOST, port, get(HOST, port, "/api/ps"))
            if status == 200 and MODEL.encode() in body:
                status, body = await fetch(HOST, port, probe)
                if status == 200:
                    return
            last = f"{status} {body[:200]!r}"
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the gateway did not route to the agent within {timeout:.0f}s: {last}")

    async def _start_nginx(self, sim_port: int) -> Target | None:
        if self.args.no_nginx:
            self.nginx_note = "nginx column skipped (--no-nginx)"
            return None
        exe = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
        )
        if exe is None:
            exe = await _install_nginx()
        if exe is None:
            self.nginx_note = "nginx column skipped: nginx is not installed and apt-get could not install it"
            print(self.nginx_note, flush=True)
            return None
        port = free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(workers=self.args.nginx_workers, dir=self.dir, sim_port=sim_port, port=port)
        )
        nginx = self.child("nginx", [exe, "-p", str(self.dir), "-c", str(conf)])
        await nginx.start()
        try:
            await wait_port(port, nginx, 15)
        except RuntimeError as e:
            self.nginx_note = f"nginx column skipped: nginx did not start ({e})"
            print(self.nginx_note, flush=True)
            await nginx.stop()
            del self.children["nginx"]
            return None
        return Target("nginx", port, [nginx])

    async def stop(self) -> None:
        """Reverse start order: nginx, gateway, agent, simulator, nats-server."""
        for c in reversed(list(self.children.values())):
            with contextlib.suppress(Exception):
                await c.stop()

    def cpu(self) -> dict[str, float]:
        out = {name: tree_cpu_seconds(c.pid) for name, c in self.children.items() if c.proc is not None}
        out["load generator"] = cpu_seconds(os.getpid())
        return out


async def _install_nginx() -> str | None:
    """apt-get install nginx-light (else nginx); None when that is not possible here."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    print("nginx not found: installing it with apt-get (nginx-light, else nginx)...", flush=True)

    def install() -> None:
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "timeout": 300}
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, **quiet)  # type: ignore[call-overload]
        for pkg in ("nginx-light", "nginx"):
            r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], check=False, env=env, **quiet)  # type: ignore[call-overload]
            if r.returncode == 0:
                return

    with contextlib.suppress(Exception):
        await asyncio.to_thread(install)
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


# -- measuring -------------------------------------------------------------------------------------
async def measure(bench: Bench, targets: list[Target], quick: bool) -> dict[str, dict[str, Run]]:
    runs: dict[str, dict[str, Run]] = {}
    warm = Spec("warmup", "warm-up", specs(True)[1].body, 64, 500 if quick else 3000, 3.0)
    warm_stream = Spec(
        "warmup", "warm-up", {**specs(True)[3].body, "options": {"num_predict": 50}}, 64, 64, 3.0
    )
    for t in targets:
        for s in (warm, warm_stream):
            await closed_loop(
                HOST,
                t.port,
                post(HOST, t.port, "/api/generate", _json(s.body)),
                concurrency=s.concurrency,
                requests=s.requests,
                time_cap=s.time_cap,
            )
    for s in specs(quick):
        runs[s.name] = {}
        for t in targets:
            raw = post(HOST, t.port, "/api/generate", _json(s.body))
            await asyncio.sleep(0.3)  # let the previous phase's stragglers settle
            before = bench.cpu()
            phase = await closed_loop(
                HOST, t.port, raw, concurrency=s.concurrency, requests=s.requests, time_cap=s.time_cap
            )
            after = bench.cpu()
            cpu = {k: after[k] - before.get(k, 0.0) for k in after}
            runs[s.name][t.name] = Run(phase, cpu)
            print(
                f"  {s.name:<7} {t.name:<7} {len(phase.ok):>6} ok {phase.errors:>3} errors "
                f"{phase.wall_s:6.2f}s  {phase.rps:9.1f} req/s  {phase.lines / max(phase.wall_s, 1e-9):10.0f} lines/s  "
                f"max {phase.max_ms():7.1f} ms  {phase.slow()} over 1 s",
                flush=True,
            )
            if phase.errors:
                bad = next(r for r in phase.results if r.error or r.status != 200)
                print(f"          first error: status={bad.status} {bad.error}", flush=True)
    return runs


# -- reporting -------------------------------------------------------------------------------------
Budget = tuple[str, Callable[[float], bool]]

BUDGETS: dict[str, Budget] = {
    "added_p50": ("≤ 1 ms", lambda v: v <= 1.0),
    "added_p99": ("≤ 2 ms", lambda v: v <= 2.0),
    "rps_c64": ("≥ 4,000", lambda v: v >= 4000),
    "chunks_s": ("≥ 150,000", lambda v: v >= 150_000),
    "cpu_chunk": ("≤ 50 µs", lambda v: v <= 50.0),
}


def proxy_cpu(run: Run, target: Target) -> float:
    return sum(run.cpu.get(c.name, 0.0) for c in target.proxy)


def report(
    runs: dict[str, dict[str, Run]], targets: list[Target], bench: Bench
) -> tuple[str, dict[str, Any]]:
    names = [t.name for t in targets]
    by = {t.name: t for t in targets}
    has_nginx = "nginx" in names

    def per(phase: str, f: Callable[[Run, Target], float]) -> dict[str, float]:
        return {n: f(runs[phase][n], by[n]) for n in names}

    def added(phase: str, f: Callable[[Phase], float]) -> dict[str, float]:
        base = f(runs[phase]["direct"].phase)
        return {n: (f(runs[phase][n].phase) - base if n != "direct" else float("nan")) for n in names}

    def cpu_per(phase: str, unit: Callable[[Phase], int]) -> dict[str, float]:
        return {
            n: (proxy_cpu(runs[phase][n], by[n]) / max(unit(runs[phase][n].phase), 1) * 1e6)
            if by[n].proxy
            else float("nan")
            for n in names
        }

    def chunks_s(r: Run, _: Target) -> float:
        return r.phase.lines / r.phase.wall_s if r.phase.wall_s else 0.0

    metrics: list[tuple[str, str, dict[str, float], str, bool]] = [
        # key, label, values, budget key, higher is better
        ("rps_c1", "req/s, non-streaming, c=1", per("c1", lambda r, _: r.phase.rps), "", True),
        ("p50_c1", "latency p50, c=1 (ms)", per("c1", lambda r, _: r.phase.lat_ms(50)), "", False),
        ("p99_c1", "latency p99, c=1 (ms)", per("c1", lambda r, _: r.phase.lat_ms(99)), "", False),
        ("added_p50", "added latency p50 vs direct, c=1 (ms)", added("c1", lambda p: p.lat_ms(50)), "added_p50", False),
        ("added_p99", "added latency p99 vs direct, c=1 (ms)", added("c1", lambda p: p.lat_ms(99)), "added_p99", False),
        ("rps_c64", "req/s, non-streaming, c=64", per("c64", lambda r, _: r.phase.rps), "rps_c64", True),
        ("p50_c64", "latency p50, c=64 (ms)", per("c64", lambda r, _: r.phase.lat_ms(50)), "", False),
        ("p99_c64", "latency p99, c=64 (ms)", per("c64", lambda r, _: r.phase.lat_ms(99)), "", False),
        ("chunks_s", f"chunks/s, 64 streams x {STREAM_TOKENS} tokens", per("stream", chunks_s), "chunks_s", True),
        ("ttft_p50", "TTFT p50, streaming c=1 (ms)", per("ttft", lambda r, _: r.phase.ttft_ms(50)), "", False),
        ("added_ttft_p50", "added TTFT p50 vs direct, c=1 (ms)", added("ttft", lambda p: p.ttft_ms(50)), "", False),
        ("added_ttft_p99", "added TTFT p99 vs direct, c=1 (ms)", added("ttft", lambda p: p.ttft_ms(99)), "", False),
        ("ttft_p50_64", "TTFT p50 within 64 streams (ms)", per("stream", lambda r, _: r.phase.ttft_ms(50)), "", False),
        ("cpu_req_c1", "proxy CPU per request, c=1 (µs)", cpu_per("c1", lambda p: len(p.ok)), "", False),
        ("cpu_req_c64", "proxy CPU per request, c=64 (µs)", cpu_per("c64", lambda p: len(p.ok)), "", False),
        ("cpu_chunk", "proxy CPU per chunk, 64 streams (µs)", cpu_per("stream", lambda p: p.lines), "cpu_chunk", False),
    ]  # fmt: skip

    header = ["metric", *names, "corral/direct"]
    if has_nginx:
        header.append("corral/nginx")
    header += ["budget (corral)", "verdict"]
    rows = []
    out_metrics: dict[str, Any] = {}
    for key, label, vals, bkey, _higher in metrics:
        row: list[str] = [label, *(fmt(vals[n]) for n in names)]
        adds = key.startswith(("added", "cpu"))
        row.append(_ratio(vals["corral"], vals["direct"]) if not adds else "—")
        if has_nginx:
            row.append(_ratio(vals["corral"], vals["nginx"]))
        verdict = ""
        budget = ""
        if bkey:
            budget, ok = BUDGETS[bkey][0], BUDGETS[bkey][1](vals["corral"])
            verdict = "pass" if ok else "MISS"
        row += [budget or "—", verdict or "—"]
        rows.append(row)
        out_metrics[key] = {
            "label": label,
            **{n: _num(vals[n]) for n in names},
            "budget": budget or None,
            "pass": (verdict == "pass") if verdict else None,
        }

    # where the CPU went, per phase and target (seconds, and share of the machine's cores)
    procs = [n for n in bench.children if n != "nginx" or has_nginx] + ["load generator"]
    cpu_rows = []
    cpu_json: dict[str, Any] = {}
    ncpu = os.cpu_count() or 1
    for phase_name, per_target in runs.items():
        for n in names:
            r = per_target[n]
            busy = sum(r.cpu.values()) / (r.phase.wall_s * ncpu) * 100 if r.phase.wall_s else 0.0
            cpu_rows.append(
                [
                    f"{phase_name} → {n}",
                    fmt(r.phase.wall_s),
                    *(fmt(r.cpu.get(p, 0.0)) for p in procs),
                    f"{busy:.0f}%",
                ]
            )
            cpu_json[f"{phase_name}/{n}"] = {
                "wall_s": r.phase.wall_s,
                "ok": len(r.phase.ok),
                "errors": r.phase.errors,
                "lines": r.phase.lines,
                "latency_ms": {
                    "p50": _num(r.phase.lat_ms(50)),
                    "p99": _num(r.phase.lat_ms(99)),
                    "max": _num(r.phase.max_ms()),
                    "over_1s": r.phase.slow(),
                },
                "cpu_s": r.cpu,
            }
    text = (
        table(header, rows)
        + "\n\nCPU seconds per process during each phase (busy = all processes / (wall x "
        + f"{ncpu} cores)):\n"
        + table(["phase → target", "wall s", *procs, "busy"], cpu_rows)
    )
    for key, bkey, label in (("rps_c64", "rps_c64", "req/s at c=64"), ("chunks_s", "chunks_s", "chunks/s")):
        direct = out_metrics[key]["direct"]
        if direct is not None and not BUDGETS[bkey][1](direct):
            text += (
                f"\nnote: direct to the simulator reaches only {fmt(direct)} {label}, under the budget "
                f"({BUDGETS[bkey][0]}): the simulator (one Python process) bounds this figure here."
            )
    if bench.nginx_note:
        text += f"\n\n{bench.nginx_note}"
    return text, {"metrics": out_metrics, "phases": cpu_json}


def _ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def _num(x: float) -> float | None:
    return None if x != x else round(x, 6)


# -- main ------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run in under 30 s")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx column")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory with the logs")
    return p


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    bench = Bench(args, workdir)
    started = time.time()
    print(f"machine: {machine()}; load generator on {loop_name()}; work dir {workdir}", flush=True)
    try:
        targets = await bench.start()
        print(f"up in {time.time() - started:.1f}s: " + ", ".join(f"{t.name} :{t.port}" for t in targets))
        runs = await measure(bench, targets, args.quick)
        text, data = report(runs, targets, bench)
        print()
        print(text, flush=True)
        if args.json:
            data |= {
                "machine": machine(),
                "nproc": os.cpu_count(),
                "quick": args.quick,
                "command": " ".join(["python -m bench.overhead", *sys.argv[1:]]),
                "started_at": started,
                "nginx_workers": args.nginx_workers if "nginx" in {t.name for t in targets} else None,
            }
            write_json(args.json, data)
            print(f"\nwrote {args.json}")
        return 0
    except (RuntimeError, OSError) as e:
        print(f"bench.overhead failed: {e}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(BaseException):
            await asyncio.shield(bench.stop())
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")


def main() -> int:
    args = parser().parse_args()
    try:
        return run(amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
