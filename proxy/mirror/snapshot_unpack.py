"""Unpacking a snapshot: its bundle fed into `git index-pack --strict` as it arrives, and what the restore is
waiting on meanwhile (the bucket or git), so that a slow bucket and a costly snapshot are told apart."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..subprocesses import reap
from .objectstore import StoreTimeout

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

# A bucket that sends less than this over this long, counting only the time the restore waited on it, is given up:
# a store that trickles (a byte every few seconds never trips the client's read timeout) would otherwise hold each
# first clone for the whole restoreTimeout.
MIN_BUCKET_BYTES, BUCKET_WINDOW = 1 << 20, 30.0


class Progress:
    """What one restore is waiting on, and the bucket's pace over the time spent waiting on it alone."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.waiting_on: Literal["bucket", "git"] = "bucket"
        self.snapshot: str | None = None  # the sha256 its manifest names, once read
        self._clock = clock
        self._since = clock()
        self._window_waited = 0.0
        self._window_bytes = 0
        self._git_seconds = 0.0
        self._git_since = 0.0

    def on_bucket(self, received: int) -> None:
        """A chunk came from the bucket. StoreTimeout when the bucket has fallen under the floor."""
        now = self._clock()
        self._window_waited += now - self._since
        self._since = now  # the next wait starts here, whether git takes this chunk or it is kept (the header's)
        self._window_bytes += received
        if self._window_waited >= BUCKET_WINDOW:
            if self._window_bytes < MIN_BUCKET_BYTES:
                raise StoreTimeout(f"the bucket sent {self._window_bytes} bytes in {self._window_waited:.0f} s")
            self._window_waited, self._window_bytes = 0.0, 0

    def on_git(self) -> None:
        """Writing to git (the pipe stays full while git is busy), or waiting for it to end: git's time."""
        if self.waiting_on != "git":
            self._git_since = self._clock()
        self.waiting_on = "git"

    def back_to_bucket(self) -> None:
        now = self._clock()
        if self.waiting_on == "git":
            self._git_seconds += now - self._git_since
        self.waiting_on = "bucket"
        self._since = now

    def git_was_the_cost(self, budget: float) -> bool:
        """When the budget ran out: was it git's doing? Only if git was at work then and took at least half of it,
        so that a bucket that spent most of the time is not excused by git's last seconds."""
        if self.waiting_on != "git":
            return False
        return self._git_seconds + self._clock() - self._git_since >= budget / 2


async def _tail(stream: asyncio.StreamReader, keep: int = 4096) -> bytes:
    """What a child printed, all read (so that it never blocks on a full pipe), the last `keep` bytes kept."""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-keep:]
    return kept


class IndexPack:
    """`git index-pack --stdin --strict` into a mirror, fed through a pipe of our own written from a thread: an
    asyncio pipe would be woken each time index-pack takes its next 4 KiB (tens of thousands of loop turns, about
    a second of CPU per 200 MiB); a blocking write of a whole chunk costs one thread hop."""

    def __init__(self, process: asyncio.subprocess.Process, pipe: int) -> None:
        assert process.stderr is not None
        self._process = process
        self._pipe: int | None = pipe
        self._writing: asyncio.Future[None] | None = None
        self._errors = asyncio.ensure_future(_tail(process.stderr))

    @classmethod
    async def start(cls, mirror: Path, size: int, env: dict[str, str]) -> IndexPack:
        # --strict: every object is checked (fsck) and so is every link: a pack missing an object is refused.
        argv = ["git", f"--git-dir={mirror}", "index-pack", "--stdin", "--strict", f"--max-input-size={size}"]
        reading, writing = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # a larger pipe: fewer switches; not everywhere
            fcntl.fcntl(writing, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=reading, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own group, killed as one by `reap` (as proxy.subprocesses does)
            )  # fmt: skip
        except BaseException:
            os.close(writing)
            raise
        finally:
            os.close(reading)
        return cls(process, writing)

    async def feed(self, data: bytes, digest: Hash | None = None) -> bool:
        """Hashed into `digest` and written, in a thread; False once index-pack no longer reads (it exited). The
        write is awaited shielded: cancelled here, it still ends before `close` lets go of the pipe."""
        assert self._pipe is not None
        self._writing = asyncio.ensure_future(asyncio.to_thread(_hash_and_write, digest, self._pipe, data))
        # A write that fails once nobody awaits it (feed cancelled, git killed by close) is expected: not logged.
        self._writing.add_done_callback(_retrieve)
        try:
            await asyncio.shield(self._writing)
        except BrokenPipeError:
            return False
        return True

    async def finish(self) -> str | None:
        """End of input; None if index-pack accepted the pack, else its last words."""
        if self._writing is not None and not self._writing.done():
            await asyncio.wait([self._writing])  # the pipe is closed after the last write, never under it
        self._close_pipe()
        if await self._process.wait() == 0:
            return None
        said = (await self._errors).decode(errors="replace").strip().splitlines()
        return said[-1][:200] if said else "no message"

    async def close(self) -> None:
        """In this order: index-pack killed, so that a write blocked on the full pipe fails at once (EPIPE); that
        write waited for; only then the pipe closed. Closed while a thread still writes, its descriptor's number
        could be reused by another file (a client's socket), and the rest of the write would land there."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        if self._writing is not None and not self._writing.done():
            # The pipe is closed when the write ends, even if this wait is cancelled meanwhile.
            self._writing.add_done_callback(lambda _: self._close_pipe())
            await asyncio.wait([self._writing])
        else:
            self._close_pipe()
        await reap(self._process)
        self._errors.cancel()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


def _hash_and_write(digest: Hash | None, pipe: int, data: bytes) -> None:
    if digest is not None:
        digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(pipe, view) :]


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
