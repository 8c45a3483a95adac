"""Serving from a mirror: `git upload-pack --stateless-rpc`, the client's request on stdin, its answer streamed out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from ..subprocesses import reap, start_process
from .gitrun import MirrorGit, clean_git_protocol

log = logging.getLogger("git_token_proxy.mirror")

READ_SIZE = 65536
# Output is held back until pack data starts (or upload-pack ends), so that a mirror that fails while counting
# objects (a missing object, a bad ref) still leaves the request free to go upstream. What comes before the pack is
# pkt-lines of acknowledgments, shallow info and progress; past this much, streaming starts anyway.
HEAD_LIMIT = 1 << 20
_PACK_SIGNATURE = b"PACK"


class UploadPackFailed(Exception):
    """upload-pack exited with an error after part of its answer was sent: the client must see a broken transfer."""


class UploadPack:
    """One run of upload-pack for one request. `close` is idempotent and always ends the process."""

    def __init__(self, process: asyncio.subprocess.Process, body: bytes, on_end: Callable[[bool], None]) -> None:
        assert process.stdin and process.stdout and process.stderr
        self._process = process
        self._stdout = process.stdout
        self._feeding = asyncio.create_task(_feed(process.stdin, body))
        self._errors = asyncio.create_task(process.stderr.read())
        self._head = b""
        self._on_end = on_end  # told once, at close, whether upload-pack failed (the mirror is then checked)
        self._closed = False
        self._failed = False

    async def read_head(self) -> bool:
        """Read until pack data starts or upload-pack ends. False: it failed before that, nothing was sent."""
        while _PACK_SIGNATURE not in self._head and len(self._head) < HEAD_LIMIT:
            chunk = await self._stdout.read(READ_SIZE)
            if not chunk:
                await self._process.wait()
                if self._process.returncode != 0:
                    self._failed = True
                    return False
                break
            self._head += chunk
        return bool(self._head)

    def __aiter__(self) -> UploadPack:
        return self

    async def __anext__(self) -> bytes:
        if self._head:
            chunk, self._head = self._head, b""
            return chunk
        chunk = await self._stdout.read(READ_SIZE)
        if chunk:
            return chunk
        await self._process.wait()
        if self._process.returncode != 0:
            self._failed = True
            raise UploadPackFailed(f"git upload-pack exited with {self._process.returncode}")
        raise StopAsyncIteration

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        killed = self._process.returncode is None  # the client went away before the end
        self._feeding.cancel()
        try:
            await reap(self._process)
        finally:
            await asyncio.gather(self._feeding, return_exceptions=True)
            stderr = await self._errors
            if self._failed and stderr.strip():
                log.warning("mirror upload-pack failed: %s", stderr.decode(errors="replace").strip()[-500:])
            # Only what looks like a broken mirror calls for fsck, which makes every reader of the repo wait: a
            # malformed request (a bad filter spec, a protocol error) is the client's problem, not the mirror's.
            self._on_end(self._failed and not killed and _looks_corrupt(stderr))


_CORRUPTION = (b"missing", b"corrupt", b"bad object", b"unable to read", b"packfile", b"loose object",
               b"not a valid", b"did not send all necessary objects", b"is not a commit", b"bad tree")  # fmt: skip


def _looks_corrupt(stderr: bytes) -> bool:
    text = stderr.lower()
    return any(sign in text for sign in _CORRUPTION)


async def start_upload_pack(
    git: MirrorGit, mirror: Path, body: bytes, git_protocol: str | None, on_end: Callable[[bool], None]
) -> UploadPack:
    # GIT_PROTOCOL as the client sent it: version=2 makes upload-pack speak v2, its absence v0.
    env = git.env(git_protocol=clean_git_protocol(git_protocol))
    process = await start_process(["git", "upload-pack", "--stateless-rpc", str(mirror)], env)
    return UploadPack(process, body, on_end)


async def _feed(stdin: asyncio.StreamWriter, body: bytes) -> None:
    """The whole body, from a task of its own: upload-pack may answer before it has read a large request."""
    try:
        with contextlib.suppress(ConnectionError):  # upload-pack exited without reading it all
            stdin.write(body)
            await stdin.drain()
    finally:
        stdin.close()
