"""The public test surface: a fake GitHub (real git behind GitHub's App API) with the proxy in front of it, for
users' own CI tests of pipelines that clone through the proxy. One call gives the URLs and a ready git config.

    with proxied_github(tmp_path, repos={"acme/app": {"README.md": b"hello\\n"}}) as world:
        subprocess.run(["git", "clone", "https://github.com/acme/app"], env=world.git_env(tmp_path / "home"))

`proxied_github` runs both servers on an event loop of its own, in a thread, so that blocking code (subprocess,
requests, a build tool) can use them; `async_proxied_github` runs them on the caller's loop, for async tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .fake_app_api import FakeApp
from .fake_github import FakeGitHub
from .gitcli import git_env, insteadof_env
from .keys import generate_app_key, pkcs1_pem

Repos = Mapping[str, Mapping[str, bytes]]  # "owner/name" -> {path: content}


@dataclass(frozen=True)
class ProxiedGitHub:
    """What a test needs: the fake (to look at what it saw, or to break it), the proxy's URL and the git config."""

    github: FakeGitHub
    app: FakeApp  # the GitHub App, installed on every owner of the repos
    proxy_url: str
    key_file: Path  # the app's private key, as an operator would have it

    @property
    def insteadof(self) -> str:
        """The one line a user adds to their git config."""
        return f'git config --global url."{self.proxy_url}/github.com/".insteadOf "https://github.com/"'

    @property
    def git_config_env(self) -> dict[str, str]:
        """The same rule as GIT_CONFIG_* variables: add them to any process that runs git."""
        return insteadof_env(self.proxy_url)

    def git_env(self, home: Path) -> dict[str, str]:
        """A whole environment for git: a throwaway HOME, no prompts, no system config, and the rule above."""
        return git_env(home, self.git_config_env)

    def config(self) -> dict[str, Any]:
        """The proxy's config, for tests that start another proxy in front of the same fake."""
        return proxy_config(self.github.url, self.app, self.key_file)


def proxy_config(
    fake_url: str, app: FakeApp, key_file: Path, settings: Mapping[str, Any] | None = None, **entry: Any
) -> dict[str, Any]:
    """github.com and its API are the fake; one app entry, for every repo on it unless `entry` says otherwise
    (`entry` adds or replaces the entry's keys: id, urlPattern, ...; `settings` go into github.appInstallation)."""
    app_entry = {"id": "test-app", "type": "GITHUB_APP_INSTALLATION", "urlPattern": r"(?<baseUrl>github\.com)/.*",
                 "apiUrl": fake_url, "clientId": app.client_id, "privateKey": str(key_file), **entry}  # fmt: skip
    return {
        "upstreams": [{"host": "github.com", "url": fake_url}],
        "github": {"appInstallation": {"auth": [app_entry], **(settings or {})}},
    }


def build_fake(root: Path, repos: Repos) -> tuple[FakeGitHub, FakeApp, Path]:
    """Set-up before serving: repos are made with the git CLI and the key is written, so this blocks briefly."""
    root.mkdir(parents=True, exist_ok=True)
    fake = FakeGitHub(root=root / "github")
    key = generate_app_key()
    app = fake.apps.add_app(key, slug="test-app")
    for owner in sorted({name.split("/")[0] for name in repos}):
        fake.apps.add_installation(app, owner)
    for name, files in repos.items():
        fake.create_repo(name, files)
    key_file = root / "test-app.private-key.pem"
    key_file.write_text(pkcs1_pem(key))
    key_file.chmod(0o600)
    return fake, app, key_file


async def start_proxy_app(config: Mapping[str, Any]) -> tuple[web.AppRunner, str]:
    """The proxy app from a config dict, served on a free loopback port of this event loop the way `serve` serves
    it (not aiohttp's TestServer, which cancels handlers when a client hangs up, which production does not).
    Returns its runner (`cleanup()` stops it) and its base URL."""
    from ..app import create_app  # the proxy itself; imported here so that the fake alone stays light
    from ..config import parse_config
    from ..forward.guards import RUNNER_ARGS

    runner = web.AppRunner(await create_app(parse_config(config, "test proxy config")), **RUNNER_ARGS)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@asynccontextmanager
async def async_proxied_github(root: Path, repos: Repos) -> AsyncIterator[ProxiedGitHub]:
    """The fake and the proxy on the running event loop; both stopped on exit. `root` holds their files."""
    fake, app, key_file = build_fake(root, repos)
    await fake.start()
    try:
        runner, proxy_url = await start_proxy_app(proxy_config(fake.url, app, key_file))
        try:
            yield ProxiedGitHub(fake, app, proxy_url, key_file)
        finally:
            await runner.cleanup()
    finally:
        await fake.close()


@dataclass(frozen=True)
class Stopper:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event


@contextmanager
def proxied_github(root: Path, repos: Repos) -> Iterator[ProxiedGitHub]:
    """The same, served from a thread with its own event loop, so that the test itself may block. A failure to
    start or to stop is raised here, in the test's thread."""
    started: concurrent.futures.Future[tuple[ProxiedGitHub, Stopper]] = concurrent.futures.Future()
    failures: list[BaseException] = []

    async def serve() -> None:
        async with async_proxied_github(root, repos) as world:
            stopper = Stopper(asyncio.get_running_loop(), asyncio.Event())
            started.set_result((world, stopper))
            await stopper.event.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as error:  # handed to the test's thread, where pytest reports it
            failures.append(error)
            if not started.done():
                started.set_exception(error)

    thread = threading.Thread(target=run, name="proxied-github", daemon=True)
    thread.start()
    world, stopper = started.result(timeout=60)
    try:
        yield world
    finally:
        stopper.loop.call_soon_threadsafe(stopper.event.set)  # an asyncio.Event is set from its own loop only
        thread.join(timeout=60)
    if failures:
        raise failures[0]
