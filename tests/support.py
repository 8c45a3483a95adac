"""What test files share: the fixtures' token and files, config builders, the git CLI, a trap server and in-process
replicas. The fixtures themselves live in conftest.py; what users may reuse lives in proxy/testing/."""

from __future__ import annotations

import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.app import PROXY
from proxy.testing import FakeApp, FakeInstallation, GitResult, git_env, run_git
from proxy.testing.harness import proxy_config, start_proxy_app

STATIC_TOKEN = "static-test-token-1234"
PRIVATE_FILES = {"README.md": b"# private\n", "src/app.py": b"print('hello')\n"}
ACME_REPOS = r"(?<baseUrl>github\.com)/acme/.*"

StartProxy = Callable[[dict[str, Any]], Awaitable[str]]
UpstreamApp = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]


@dataclass
class AcmeApp:
    """A GitHub App installed on the whole `acme` account, with its key in a file as an operator would have it."""

    key: rsa.RSAPrivateKey
    app: FakeApp
    installation: FakeInstallation
    key_file: Path


def app_config(fake_url: str, acme: AcmeApp, settings: dict[str, Any] | None = None, **entry: Any) -> dict[str, Any]:
    """github.com routed to the fake, and one GitHub App entry for the acme org whose API is the fake too."""
    return proxy_config(
        fake_url, acme.app, acme.key_file, settings, **{"id": "acme-app", "urlPattern": ACME_REPOS, **entry}
    )


def static_config(fake_url: str, **overrides: Any) -> dict[str, Any]:
    """github.com routed to the fake, with one static-token entry for the acme org."""
    entry = {"id": "acme-bot", "type": "oauth_token", "urlPattern": ACME_REPOS, "token": STATIC_TOKEN}
    config: dict[str, Any] = {
        "upstreams": [{"host": "github.com", "url": fake_url}],
        "github": {"appInstallation": {"auth": [entry]}},
    }
    config.update(overrides)
    return config


class Git:
    """The real git CLI with a throwaway HOME: no user config, no credential helper, prompts turned into errors."""

    def __init__(self, home: Path, workdir: Path) -> None:
        self.env = git_env(home)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    async def __call__(self, *args: str, cwd: Path | None = None, check: bool = True) -> GitResult:
        result = await run_git(*args, env=self.env, cwd=cwd or self.workdir)
        return result.check() if check else result


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


class Replicas:
    """In-process proxies: each a whole proxy app (its own caches and Redis client) on its own port, served as
    `serve` serves it."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []

    async def start(self, config: dict[str, Any]) -> str:
        runner, url = await start_proxy_app(config)
        self.runners.append(runner)
        return url

    def metric(self, index: int, name: str) -> float:
        metrics = self.runners[index].app[PROXY].metrics
        value = metrics.registry.get_sample_value(name)
        return value if value is not None else 0.0

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
