"""`python -m corral.simulator` / `corral sim`: run ollama-sim until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from corral.simulator.config import ConfigError, load_config
from corral.simulator.server import SimServer

log = logging.getLogger(__name__)

EPILOG = """\
The simulator answers the Ollama HTTP API (and its OpenAI-compatible /v1 routes) like a GPU box:
models with sizes, VRAM per GPU, load time from size, prompt/decode rates from model size,
parallel slots with a prompt cache, keep_alive timers, Ollama's eviction and queue rules.
Flags override the --config TOML file, which overrides the built-in defaults (one 24 GB NVIDIA
GPU serving llama3.2, qwen3:8b and all-minilm; more models available to pull).

examples:
  python -m corral.simulator --port 11500 --time-scale 0.1
  python -m corral.simulator --config sim.toml --vendor amd --vram-gb 48 --num-parallel 4
  python -m corral.simulator --time-scale 0   # no delays at all (benchmarks)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="corral sim",
        description="Simulated Ollama server (Ollama HTTP API) for demos, tests and benchmarks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=11434, help="port, 0 = any free port (default: %(default)s)")
    p.add_argument("--config", metavar="FILE", help="TOML settings file (vendor, gpus, models, ...)")
    p.add_argument(
        "--vendor", choices=["nvidia", "amd", "intel", "apple", "cpu"], help="GPU vendor to simulate"
    )
    p.add_argument("--vram-gb", type=float, help="VRAM of every configured GPU, in GB")
    p.add_argument("--num-parallel", type=int, help="parallel slots per loaded model (OLLAMA_NUM_PARALLEL)")
    p.add_argument("--speed", type=float, help="speed relative to the built-in rates (2 = twice as fast)")
    p.add_argument(
        "--time-scale",
        type=float,
        help="multiplies every delay: 0.01 = 100x faster, 0 = no delays (default 1)",
    )
    p.add_argument("--seed", type=int, help="seed for generated text and embeddings")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def serve(server: SimServer) -> None:
    """Run until SIGINT/SIGTERM (an event, not a sleep loop), then stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(
            args.config,
            vendor=args.vendor,
            vram_gb=args.vram_gb,
            num_parallel=args.num_parallel,
            speed=args.speed,
            time_scale=args.time_scale,
            seed=args.seed,
        )
    except ConfigError as e:
        log.error("%s", e)
        return 2
    server = SimServer(config, host=args.host, port=args.port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(server))
    else:
        uvloop.run(serve(server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
