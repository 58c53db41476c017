"""The command line: ``python -m bench.routing`` runs every chosen workload under every chosen
policy (a gateway strategy, or ``herd``: the same workload through ollama-herd, see
`bench.routing.peer`), prints a progress line per run and the report, and writes the JSON file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corral.routing import STRATEGIES

import bench.routing
from bench.common import loop_name, machine, run, write_json
from bench.routing import herd
from bench.routing.fleet import MACHINES, fleet_sims, scaled_periods
from bench.routing.netns import NamespaceUnavailable, unavailable
from bench.routing.peer import PeerFailed, run_herd
from bench.routing.report import PEERS, comparison, finite, progress, section
from bench.routing.results import RunResult, pool
from bench.routing.run import run_one
from bench.routing.workloads import QUICK, WORKLOADS, Knobs

POLICIES = ("auto", "round_robin", "random", "least_connection")  # the default choice
VALID = (*STRATEGIES, *PEERS)
DEFAULT_TIME_SCALE = 0.2
DEFAULT_JSON = Path(__file__).parent.parent / "results" / "routing.json"


def parser() -> argparse.ArgumentParser:
    doc = bench.routing.__doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=doc.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="workload and simulator seed (default 1)")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {', '.join(WORKLOADS)} (default all)",
    )
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated strategies to compare, and 'herd' for ollama-herd {herd.HERD_VERSION} on the "
        f"same simulators (installed into its own virtualenv on first use; needs root for a network "
        f"namespace) (default {','.join(POLICIES)})",
    )
    p.add_argument(
        "--herd-venv",
        metavar="DIR",
        default=str(herd.default_venv()),
        help="ollama-herd's virtualenv, created there on first use (default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each workload under each policy N times, each on a fresh fleet, and pool them: "
        "percentiles over all requests, loads per run (default 1)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=f"wall seconds per simulated second (default {DEFAULT_TIME_SCALE})",
    )
    p.add_argument(
        "--cap",
        type=float,
        default=150.0,
        help="wall seconds one workload may run under one policy before it is cut off (default 150)",
    )
    p.add_argument("--json", metavar="FILE", default=str(DEFAULT_JSON), help="write the figures here too")
    p.add_argument("--keep-logs", action="store_true", help="keep the fleet's warnings log")
    return p


def split(value: str, valid: Sequence[str], what: str) -> list[str]:
    """A comma-separated choice from ``valid``; exits naming what is unknown."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise SystemExit(f"unknown {what}: {', '.join(bad) or '(none)'}; valid: {', '.join(valid)}")
    return items


async def bench_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every workload under every policy; prints progress and the tables, returns the JSON data."""
    workloads = [WORKLOADS[w] for w in split(args.workloads, list(WORKLOADS), "workload")]
    policies = split(args.policies, VALID, "policy")
    knobs = QUICK if args.quick else Knobs()
    data: dict[str, Any] = {
        "machine": machine(),
        "nproc": os.cpu_count(),
        "loop": loop_name(),
        "seed": args.seed,
        "time_scale": args.time_scale,
        "quick": bool(args.quick),
        "repeat": args.repeat,
        "knobs": knobs.__dict__,
        "scaled_periods": {cls.__name__: fields for cls, fields in scaled_periods(args.time_scale).items()},
        "fleet": [
            {
                "agent": f"{m.vendor}-{i}",
                "gpu": m.gpu,
                "vram_gb": m.vram_gb,
                "speed": m.speed,
                "num_parallel": m.parallel,
            }
            for i, m in enumerate(MACHINES)
        ],
        "workloads": {},
    }
    if "herd" in policies:
        data["peers"] = {"herd": await herd_setup(args)}
        if "error" in data["peers"]["herd"]:
            policies.remove("herd")
    texts = []
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    for w in workloads:
        results = []
        for p in list(policies):
            runs = []
            for _ in range(args.repeat):
                try:
                    r = await run_policy(args, w.name, p, knobs)
                except (PeerFailed, NamespaceUnavailable) as e:
                    print(f"herd: skipped from here on: {e}", flush=True)
                    data["peers"]["herd"]["error"] = str(e)
                    policies.remove(p)
                    break
                print(progress(r), flush=True)
                runs.append(r)
            else:
                results.append(pool(runs))
        text, entry = section(w, results, fleet_sims(args.seed, args.time_scale, w.context_length))
        texts.append(text)
        data["workloads"][w.name] = entry
        summaries[w.name] = entry["policies"]
    print()
    print("\n\n".join(texts))
    side_by_side = comparison(summaries) if any(p in policies for p in PEERS) else ""
    if side_by_side:
        print("\n## auto against the baselines and herd, per workload\n")
        print(side_by_side)
    return data


async def run_policy(args: argparse.Namespace, workload: str, policy: str, knobs: Knobs) -> RunResult:
    """One run of ``workload`` under a gateway strategy, or through a peer router."""
    if policy == "herd":
        return await run_herd(
            workload,
            seed=args.seed,
            time_scale=args.time_scale,
            cap=args.cap,
            quick=bool(args.quick),
            venv=Path(args.herd_venv),
            keep_logs=args.keep_logs,
        )
    return await run_one(
        WORKLOADS[workload], policy, seed=args.seed, time_scale=args.time_scale, knobs=knobs, cap=args.cap
    )


async def herd_setup(args: argparse.Namespace) -> dict[str, Any]:
    """herd's virtualenv, installed on first use; prints one line either way. Its JSON entry:
    the release, what is configured, the virtualenv's packages, or the error."""
    entry: dict[str, Any] = {
        "requirement": herd.REQUIREMENT,
        "venv": args.herd_venv,
        "router_settings": herd.ROUTER_SETTINGS | herd.scaled(herd.ROUTER_PERIODS, args.time_scale),
        "node_settings": herd.NODE_SETTINGS | herd.scaled(herd.NODE_PERIODS, args.time_scale),
    }
    try:
        why = unavailable()
        if why:
            raise herd.HerdUnavailable(f"herd runs in a network namespace: {why}")
        done = await asyncio.to_thread(herd.ensure_installed, Path(args.herd_venv))
    except herd.HerdUnavailable as e:
        print(f"herd: skipped, the other policies run: {e}", flush=True)
        return entry | {"error": str(e)}
    print(f"herd: {herd.REQUIREMENT} {'installed into' if done.fresh else 'from'} {done.venv}", flush=True)
    return entry | {"packages": done.freeze}


async def amain(args: argparse.Namespace) -> int:
    # SIGTERM stops the run as Ctrl-C does: every fleet, namespace and child process is removed
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    knobs = QUICK if args.quick else Knobs()
    print(
        f"machine: {machine()}; {loop_name()}; seed {args.seed}; time_scale {args.time_scale:g} "
        f"(times below are simulated seconds); {len(MACHINES)} simulated servers; "
        f"{'quick' if args.quick else 'full'} counts {knobs}",
        flush=True,
    )
    t0 = time.perf_counter()
    data = await bench_all(args)
    data["wall_s"] = time.perf_counter() - t0
    data["command"] = " ".join(["python -m bench.routing", *sys.argv[1:]])
    print(f"\ntotal wall time {data['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, finite(data))
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    args = parser().parse_args()
    split(args.workloads, list(WORKLOADS), "workload")  # fail before anything starts
    split(args.policies, VALID, "policy")
    if args.time_scale <= 0:
        print("--time-scale must be > 0 (times are measured on the wall clock)", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    # the fleet runs in this process: its warnings go to a file (counted per run), not the tables
    logdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    handler = logging.FileHandler(logdir / "fleet.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        return run(amain(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("stopped: the run was interrupted", file=sys.stderr)
        return 130
    finally:
        handler.close()
        if args.keep_logs:
            print(f"fleet warnings: {logdir / 'fleet.log'}")
        else:
            with contextlib.suppress(OSError):
                (logdir / "fleet.log").unlink()
                logdir.rmdir()
