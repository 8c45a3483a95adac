"""Fixtures: a fake GitHub served by real `git http-backend`, the proxy in front of it, and an isolated git CLI.
What test files import lives in tests/support.py (and proxy/testing/)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpServer
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.testing import FakeGitHub, generate_app_key, pkcs1_pem
from proxy.testing.fake_lfs import FakeLfs
from proxy.testing.process import ServeProcess, kill_all
from proxy.testing.redis import RedisServer
from proxy.testing.s3 import SeaweedS3
from tests.support import PRIVATE_FILES, STATIC_TOKEN, AcmeApp, Git, Replicas, StartProxy, TrapServer, UpstreamApp


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


@pytest.fixture
def acme_app(fake_github: FakeGitHub, app_key: rsa.RSAPrivateKey, tmp_path: Path) -> AcmeApp:
    for name in ("private", "other", "third", "fourth"):
        fake_github.create_repo(f"acme/{name}", {**PRIVATE_FILES, "name.txt": name.encode()})
    app = fake_github.apps.add_app(app_key)
    installation = fake_github.apps.add_installation(app, "acme")
    key_file = tmp_path / "acme-app.pem"
    key_file.write_text(pkcs1_pem(app_key))
    return AcmeApp(app_key, app, installation, key_file)


@pytest.fixture
def private_repo(fake_github: FakeGitHub) -> str:
    fake_github.create_repo("acme/private", PRIVATE_FILES)
    fake_github.add_token(STATIC_TOKEN, repos=["acme/private", "acme/other"])
    return "acme/private"


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Starts the real proxy app from a config dict, in this event loop, served as `serve` does; returns its base
    URL. Every one started is stopped after the test."""
    started = Replicas()
    yield started.start
    await started.close()


@pytest.fixture
def git(tmp_path: Path) -> Git:
    return Git(tmp_path / "home", tmp_path / "work")


@pytest.fixture
def trap() -> Iterator[TrapServer]:
    server = TrapServer()
    yield server
    server.close()


@pytest.fixture
def upstream_app(aiohttp_server: AiohttpServer) -> UpstreamApp:
    """A one-handler upstream for the failure modes a real GitHub only shows on a bad day."""

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{path:.*}", handler)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    started = Replicas()
    yield started
    await started.close()


@pytest.fixture
async def serve_process(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServeProcess]]]:
    """Starts `python -m proxy serve` from a config dict and extra arguments (or, with None and `env`, from the
    environment alone); every one still running after the test is killed."""
    started: list[ServeProcess] = []

    async def start(config: dict[str, Any] | None, *extra: str, env: dict[str, str] | None = None) -> ServeProcess:
        process = ServeProcess(tmp_path, config, *extra, env=env)
        started.append(process)
        await process.start()
        return process

    yield start
    await kill_all(started)


@pytest.fixture
async def lfs(fake_github: FakeGitHub, private_repo: str, tmp_path: Path) -> AsyncIterator[FakeLfs]:
    storage = FakeLfs(root=tmp_path / "lfs")
    await storage.start()
    fake_github.lfs = storage
    yield storage
    await storage.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real S3-compatible server (SeaweedFS) for the whole run: each test makes buckets of its own."""
    with SeaweedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server
