"""Serves a bare repo through the real `git http-backend` CGI, streaming both ways, as GitHub's git endpoints do."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ..subprocesses import reap, start_process

log = logging.getLogger("git_token_proxy.testing.git_backend")


def find_http_backend() -> str:
    try:
        exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        exec_path = "/usr/lib/git-core"
    for candidate in (Path(exec_path) / "git-http-backend", Path("/usr/lib/git-core/git-http-backend")):
        if candidate.is_file():
            return str(candidate)
    raise RuntimeError("git http-backend not found; install git")


async def serve_with_http_backend(
    request: web.Request,
    project_root: Path,
    path_info: str,
    remote_user: str | None,
    backend: str,
    bytes_per_second: float | None = None,
    count_bytes: Callable[[int], None] | None = None,
) -> web.StreamResponse:
    """`bytes_per_second` caps the response body's rate (a slow GitHub); `count_bytes` hears of every body chunk."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_PROJECT_ROOT": str(project_root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path_info,
        "REQUEST_METHOD": request.method,
        "QUERY_STRING": request.query_string,
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "REMOTE_ADDR": request.remote or "127.0.0.1",
        # http-backend inflates gzip bodies itself; it only needs to be told.
        "HTTP_CONTENT_ENCODING": request.headers.get("Content-Encoding", ""),
        "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
    }
    if "Content-Length" in request.headers:
        env["CONTENT_LENGTH"] = request.headers["Content-Length"]  # absent: chunked, read to EOF
    if remote_user:
        env["REMOTE_USER"] = remote_user  # http-backend enables receive-pack only for authenticated users
    # Its own process group: http-backend runs upload-pack and pack-objects, which must die with it.
    process = await start_process([backend], env)
    assert process.stdin and process.stdout and process.stderr
    feeding = asyncio.create_task(_feed_stdin(request, process.stdin))
    errors = asyncio.create_task(process.stderr.read())
    try:
        status, headers = await _read_cgi_headers(process.stdout)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        pace = _Pace(bytes_per_second)
        while chunk := await process.stdout.read(65536):
            await response.write(chunk)
            if count_bytes is not None:
                count_bytes(len(chunk))
            await pace.sent(len(chunk))
        await response.write_eof()
        return response
    finally:
        feeding.cancel()
        await _reap(process, errors)


class _Pace:
    """Holds a transfer to a rate: after each chunk, sleep until the bytes so far are due. Measured from the start,
    not per chunk, so the time spent writing counts too and the average rate is the one asked for."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self._rate = bytes_per_second
        self._started = time.monotonic()
        self._sent = 0

    async def sent(self, size: int) -> None:
        if not self._rate:
            return
        self._sent += size
        due = self._started + self._sent / self._rate
        await asyncio.sleep(max(0.0, due - time.monotonic()))


async def _reap(process: asyncio.subprocess.Process, errors: asyncio.Task[bytes]) -> None:
    await reap(process)
    stderr = await errors
    if stderr.strip():
        log.debug("http-backend: %s", stderr.decode(errors="replace").strip())


async def _feed_stdin(request: web.Request, stdin: asyncio.StreamWriter) -> None:
    try:
        async for chunk in request.content.iter_any():
            stdin.write(chunk)
            await stdin.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        stdin.close()


async def _read_cgi_headers(stdout: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status, headers = 200, {}
    while line := (await stdout.readline()).decode("latin-1").rstrip("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.split()[0])
        else:
            headers[name.strip()] = value.strip()
    return status, headers
