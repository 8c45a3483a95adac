"""Child processes (git) that never outlive their use: a session of their own, killed as a group, always reaped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_READ_SIZE = 65536


@dataclass(frozen=True)
class Finished:
    """What a child left behind once it exited."""

    returncode: int
    stdout: bytes
    stderr: bytes


async def start_process(
    argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, stdin: bool = True
) -> asyncio.subprocess.Process:
    """Pipes for stdout and stderr (and stdin unless told otherwise), in a session of its own: git runs helpers
    (pack-objects, index-pack, remote-https) that must die with it when it is killed."""
    return await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=dict(env),
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def reap(process: asyncio.subprocess.Process) -> None:
    """Kill the whole group if it still runs, then drain and wait: a grandchild holding stdout, or a paused pipe,
    would otherwise keep the subprocess transport open past the event loop. Cancellation (a server shutting down,
    a client gone) does not interrupt this."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    try:
        await _drain_and_wait(process)
    except asyncio.CancelledError:
        await _drain_and_wait(process)
        raise


async def _drain_and_wait(process: asyncio.subprocess.Process) -> None:
    if process.stdout is not None:
        while await process.stdout.read(_READ_SIZE):
            pass
    await process.wait()


async def run_process(
    argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, input: bytes | None = None
) -> Finished:
    """Run to completion and collect its output. Cancelled, the child and its helpers are killed and reaped
    before the cancellation goes on."""
    process = await start_process(argv, env, cwd=cwd, stdin=input is not None)
    try:
        stdout, stderr = await process.communicate(input)
    except BaseException:
        await reap(process)
        raise
    assert process.returncode is not None
    return Finished(process.returncode, stdout, stderr)
