"""One ``ollama serve`` per GPU, started and supervised by the agent.

One Ollama loads a model once, whatever the number of GPUs; to use every GPU of a host, run one
Ollama per GPU and one agent beside each. `OllamaServe` is that Ollama: it sees only its GPU
(`ollama_env`), listens on its own port, shares the host's model directory, and is restarted with a
capped backoff when it exits. Its output is logged line by line, prefixed with its GPU. Around each
run it calls ``on_up`` (once it logs that it listens, or after `READY_WAIT_S` in any case) and
``on_down`` (once it exited): the caller starts and stops that GPU's agent there, so the fleet never
routes to an Ollama that is not running.

Which GPU a process sees, by vendor::

    nvidia   CUDA_VISIBLE_DEVICES=N, CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA then numbers GPUs as NVML does)
    amd      ROCR_VISIBLE_DEVICES=N (amdgpu card order) and HIP_VISIBLE_DEVICES=0 (HIP numbers only
             the devices ROCr left visible, so the one GPU is HIP's 0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping

from corral.agent.lifecycle import wait_at_most
from corral.runtime.tasks import BACKOFF_FIRST_S, BACKOFF_MAX_S, cancel_and_wait

log = logging.getLogger(__name__)
ollama_log = logging.getLogger(f"{__name__}.ollama")

OLLAMA = "ollama"  # the executable, looked up on PATH
READY_WAIT_S = 60.0  # an Ollama that never logs "Listening on" gets its agent after this anyway
STOP_GRACE_S = 10.0  # on stop, SIGTERM, then SIGKILL after this
HEALTHY_S = 30.0  # a run this long resets the backoff
_LISTENING = re.compile(rb"listening on", re.IGNORECASE)  # Ollama: "Listening on 127.0.0.1:11434"
_LINE_LIMIT = 1 << 20


def ollama_env(
    base: Mapping[str, str],
    *,
    vendor: str,
    gpu: int,
    port: int,
    parallel: int,
    max_loaded_models: int = 0,
    models_dir: str = "",
    context_length: int = 0,
) -> dict[str, str]:
    """The environment of GPU ``gpu``'s ``ollama serve``: ``base`` (the agent's own) with the GPU,
    the address and the agent's view of Ollama's settings pinned, so the two agree."""
    env = dict(base)
    env["OLLAMA_HOST"] = f"127.0.0.1:{port}"
    env["OLLAMA_NUM_PARALLEL"] = str(parallel)
    if max_loaded_models:
        env["OLLAMA_MAX_LOADED_MODELS"] = str(max_loaded_models)
    if models_dir:
        env["OLLAMA_MODELS"] = models_dir
    if context_length:
        env["OLLAMA_CONTEXT_LENGTH"] = str(context_length)
    if vendor == "nvidia":
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    elif vendor == "amd":
        env["ROCR_VISIBLE_DEVICES"] = str(gpu)
        env["HIP_VISIBLE_DEVICES"] = "0"
    return env


def ports(first: int, count: int) -> list[int]:
    """``first``, ``first + 1``, … for ``count`` GPUs; ``first`` 0: a free port each (chosen now,
    kept across restarts)."""
    if first:
        if first + count - 1 > 65535:
            raise ValueError(f"ports {first}..{first + count - 1} run past 65535")
        return [first + i for i in range(count)]
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class OllamaServe:
    """GPU ``gpu``'s ``ollama serve``, kept running until `stop`."""

    def __init__(
        self,
        gpu: int,
        env: Mapping[str, str],
        *,
        on_up: Callable[[], Awaitable[None]],
        on_down: Callable[[], Awaitable[None]],
        executable: str = OLLAMA,
        first_s: float = BACKOFF_FIRST_S,
        max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.gpu = gpu
        self.env = dict(env)
        self.executable = executable
        self._on_up = on_up
        self._on_down = on_down
        self._first_s, self._max_s = first_s, max_s
        self._stopping = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0  # how many times it was started

    async def run(self) -> None:
        """Start it, and start it again after each exit (capped exponential backoff) until `stop`."""
        clock = asyncio.get_running_loop().time
        backoff = self._first_s
        while not self._stopping.is_set():
            started = clock()
            try:
                code = await self._run_once()
            except OSError as e:  # no such executable, not executable
                log.error("gpu%d: cannot start %s: %s", self.gpu, self.executable, e)
                code = None
            if self._stopping.is_set():
                return
            if clock() - started >= HEALTHY_S:
                backoff = self._first_s
            log.warning("gpu%d: ollama serve exited (%s); restarting in %.1fs", self.gpu, code, backoff)
            await wait_at_most(self._stopping, backoff)  # a backoff period, ended early by stop
            backoff = min(backoff * 2, self._max_s)

    async def stop(self) -> None:
        """Stop restarting it and end it: SIGTERM, then SIGKILL after `STOP_GRACE_S`. Idempotent."""
        self._stopping.set()
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("gpu%d: ollama serve ignored SIGTERM for %.0fs; killing it", self.gpu, STOP_GRACE_S)
            process.kill()
            await process.wait()

    async def _run_once(self) -> int:
        """One run: start, log its output, ``on_up`` once it listens, ``on_down`` once it exited."""
        self.process = process = await asyncio.create_subprocess_exec(
            self.executable,
            "serve",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=_LINE_LIMIT,
            # its own session: a Ctrl-C at the agent's terminal reaches the agent, which drains its
            # agents first and then stops this Ollama; and it dies with the agent (no orphan)
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1
        log.info("gpu%d: started ollama serve (pid %d) on %s", self.gpu, process.pid, self.env["OLLAMA_HOST"])
        listening = asyncio.Event()
        output = asyncio.create_task(self._log_output(process, listening), name=f"gpu{self.gpu}-log")
        exited = asyncio.create_task(process.wait(), name=f"gpu{self.gpu}-wait")
        up = False
        try:
            ready = asyncio.create_task(wait_at_most(listening, READY_WAIT_S))
            await asyncio.wait((ready, exited), return_when=asyncio.FIRST_COMPLETED)
            await cancel_and_wait([ready])
            if not exited.done():
                if not listening.is_set():
                    log.warning(
                        "gpu%d: no 'Listening on' line in %.0fs; serving it anyway", self.gpu, READY_WAIT_S
                    )
                up = True
                await self._on_up()
            return await exited
        finally:
            if up:
                await self._on_down()
            if process.returncode is None:  # cancelled: do not leave it behind
                process.kill()
                await process.wait()
            await output

    async def _log_output(self, process: asyncio.subprocess.Process, listening: asyncio.Event) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line over the limit: log what there is of it
                line = await process.stdout.read(_LINE_LIMIT)
            if not line:
                return
            if not listening.is_set() and _LISTENING.search(line):
                listening.set()
            ollama_log.info("gpu%d | %s", self.gpu, line.decode(errors="replace").rstrip())


def _die_with_parent() -> None:
    """In the child, before ``ollama serve`` runs: on Linux, SIGTERM it when the agent dies, even by
    SIGKILL (``PR_SET_PDEATHSIG``); elsewhere nothing."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
