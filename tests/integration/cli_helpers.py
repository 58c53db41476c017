"""The ``corral`` command run as people run it: a real process (``python -m corral.cli``), its
output captured, bounded in time."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping

CLI_TIMEOUT_S = 60.0


def without_corral_settings(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment less every ``CORRAL_*`` variable, plus ``extra``: a command so
    started is configured by its flags and ``extra`` alone."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")} | dict(extra or {})


async def corral(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
) -> tuple[int, str, str]:
    """Run ``corral ARGS`` to its end (with ``env``, else this process's environment): its exit
    status, standard output and standard error."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.cli",
        *args,
        env=None if env is None else dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # out of time: no process outlives its test
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def corral_ok(*args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT_S) -> str:
    """`corral` that must succeed (exit status 0, else fail with its standard error): its output."""
    code, out, err = await corral(*args, env=env, timeout=timeout)
    assert code == 0, f"corral {' '.join(args)} exited {code}:\n{err}"
    return out
