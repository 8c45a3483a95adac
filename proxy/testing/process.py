"""The real CLI as a child process, for tests and benches: `python -m proxy serve` on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

HOST = "127.0.0.1"  # every process started here listens on loopback only
START_TIMEOUT = 30.0  # seconds for `serve` to answer /healthz
STOP_TIMEOUT = 30.0  # seconds for `serve` to drain and exit after SIGTERM


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now. Racy in theory (another process may take it before the child binds it);
    fine on a test or bench machine."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """`python -m proxy serve` from a config file in `folder`, which `write_config` replaces atomically (as a
    ConfigMap update would); or, with `config=None`, from the environment `env` alone. Its stderr is kept in
    `folder` for reading; stdin and stdout are closed."""

    def __init__(
        self, folder: Path, config: dict[str, Any] | None, *extra: str, env: Mapping[str, str] | None = None
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path: Path | None = folder / "config.yaml" if config is not None else None
        self.stderr_path = folder / "serve.stderr"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.extra = extra
        self.env = dict(env) if env is not None else None
        if config is not None:
            self.write_config(config)
        self.process: asyncio.subprocess.Process | None = None
        self.terminated = False

    def write_config(self, config: dict[str, Any] | str) -> None:
        if self.config_path is None:
            raise ValueError("this proxy reads its config from the environment, not from a file")
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.config_path)  # atomic: a watcher never reads half a file

    async def start(self) -> None:
        source = ["--config", str(self.config_path)] if self.config_path is not None else []
        args = ["-m", "proxy", "serve", *source, "--port", str(self.port), *self.extra]
        with self.stderr_path.open("wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env=self.env,
            )  # fmt: skip
        await self.wait_for(lambda: self.answers("/healthz"), "the proxy to start", START_TIMEOUT)

    def answers(self, path: str, timeout: float = 1) -> bool:
        """A plain GET on its own connection answered 200 within `timeout`."""
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """Its stderr as JSON log records (`--log-format json`)."""
        return [json.loads(line) for line in self.stderr.splitlines() if line.strip()]

    async def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
        """Polls `condition`; an AssertionError with the whole stderr if serve exits or time runs out first."""
        await self._poll(condition, what, seconds, self._must_run, pause=0.05)

    async def keeps_answering_until(self, condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
        """Polls /healthz until `condition` holds; each poll must be answered within 5 s, so an event loop that a
        reload stalls is an AssertionError."""
        await self._poll(condition, what, seconds, self._must_answer, pause=0.1)

    async def _poll(
        self, condition: Callable[[], bool], what: str, seconds: float, check: Callable[[], Awaitable[None]],
        pause: float,
    ) -> None:  # fmt: skip
        deadline = time.monotonic() + seconds
        while not condition():
            await check()
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr}")
            await asyncio.sleep(pause)

    async def _must_run(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise AssertionError(f"serve exited ({self.process.returncode}):\n{self.stderr}")

    async def _must_answer(self) -> None:
        if not await asyncio.to_thread(self.answers, "/healthz", 5):
            raise AssertionError(f"/healthz stalled:\n{self.stderr}")

    async def signal(self, signum: int) -> None:
        process = self._started()
        self.terminated |= signum == signal.SIGTERM
        process.send_signal(signum)

    async def stop(self) -> int:
        """SIGTERM once (a second one, after the drain ended, would meet the default handler), then the exit
        code; TimeoutError if it has not exited within STOP_TIMEOUT."""
        process = self._started()
        if not self.terminated and process.returncode is None:
            await self.signal(signal.SIGTERM)
        return await asyncio.wait_for(process.wait(), STOP_TIMEOUT)

    async def kill(self) -> None:
        """SIGKILL if it still runs: a test or bench that failed half-way must not leave a proxy behind."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def _started(self) -> asyncio.subprocess.Process:
        if self.process is None:
            raise RuntimeError("serve was not started")
        return self.process


async def kill_all(processes: Iterable[ServeProcess]) -> None:
    for process in processes:
        await process.kill()
