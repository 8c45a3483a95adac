"""The fleet bench's world: a fake GitHub with one app on several orgs, a real redis-server and its meter, replicas
as `python -m proxy serve` processes, and the requests and clones sent through them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.fernet import Fernet

from bench.common import HOST, STOP_TIMEOUT, Stopwatch
from proxy.testing import FakeApp, FakeGitHub, git_env
from proxy.testing.harness import build_fake, proxy_config
from proxy.testing.process import ServeProcess
from proxy.testing.redis import RedisMeter, RedisServer

ENTRY = "fleet"  # the one auth entry's id
ORGS = ("acme", "octo", "umbrella", "initech")
MINT_PATH = re.compile(r"/app/installations/(\d+)/access_tokens$")
LOOKUP_PATH = re.compile(r"/(?:orgs|users)/([^/]+)/installation$")


@dataclass
class World:
    fake: FakeGitHub
    redis: RedisServer
    meter: RedisMeter
    workdir: Path
    app: FakeApp  # installed on every org
    key_file: Path
    orgs: list[str]
    repos: list[str]  # repo names, in every org
    git_env: dict[str, str]
    args: argparse.Namespace
    fernet_key: str = field(default_factory=lambda: Fernet.generate_key().decode())

    def config(self, shared: bool, key_prefix: str = "git-token-proxy") -> dict[str, Any]:
        """One app entry for every repo on the fake; with `shared`, the fleet's Redis under `key_prefix`."""
        config = proxy_config(self.fake.url, self.app, self.key_file, id=ENTRY)
        if shared:
            config["cache"] = {
                "redis": {
                    "url": self.redis.url, "keyPrefix": key_prefix, "encryptionKey": self.fernet_key,
                    "connectTimeout": "1s",
                }
            }  # fmt: skip
        return config


async def build_world(workdir: Path, redis: RedisServer, args: argparse.Namespace) -> World:
    """The fake GitHub, started: each org an installation of the one app, each with the same repos."""
    orgs = list(ORGS[: args.installations])
    repos = [f"repo{index}" for index in range(args.repos)]
    files = {f"{org}/{repo}": {"name.txt": f"{org}/{repo}".encode()} for org in orgs for repo in repos}
    fake, app, key_file = build_fake(workdir, files)
    fake.apps.mint_latency = args.mint_latency
    await fake.start(HOST)
    env = git_env(workdir / "client-home")
    return World(fake, redis, RedisMeter(redis), workdir, app, key_file, orgs, repos, env, args)


def api_calls(fake: FakeGitHub, since: int) -> tuple[Counter[str], Counter[str]]:
    """(successful mints per org, successful installation look-ups per org) among the API calls after `since`."""
    installation_of: dict[int, str] = {i.id: i.account for i in fake.apps.installations.values()}
    mints: Counter[str] = Counter()
    lookups: Counter[str] = Counter()
    for call in fake.apps.calls[since:]:
        if call.status not in (200, 201):
            continue
        if found := MINT_PATH.search(call.path):
            mints[installation_of.get(int(found.group(1)), found.group(1))] += 1
        elif found := LOOKUP_PATH.search(call.path):
            lookups[found.group(1).lower()] += 1
    return mints, lookups


# ---------------------------------------------------------------- replicas


@contextlib.asynccontextmanager
async def replicas(folder: Path, config: dict[str, Any], count: int) -> AsyncIterator[list[ServeProcess]]:
    """`count` replicas with one config, started at once; all stopped when the block is left, whatever happens."""
    started = [
        ServeProcess(folder / f"replica-{index}", config, "--host", HOST, "--log-level", "WARNING")
        for index in range(count)
    ]
    try:
        await asyncio.gather(*(replica.start() for replica in started))
        yield started
    finally:
        await asyncio.gather(*(stop(replica) for replica in started))


async def stop(replica: ServeProcess) -> None:
    """SIGTERM: it drains (nothing is in flight) and exits; SIGKILL if it has not within STOP_TIMEOUT."""
    if replica.process is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await replica.stop()
    await replica.kill()


async def scrape(session: aiohttp.ClientSession, replica: ServeProcess) -> dict[str, float]:
    """The replica's unlabelled counters and gauges from /metrics (the ops routes share the git port here)."""
    async with session.get(f"{replica.url}/metrics") as response:
        text = await response.text()
    return {name: float(value) for name, value in re.findall(r"^(git_token_proxy_\w+) (\S+)$", text, re.MULTILINE)}


async def info_refs(session: aiohttp.ClientSession, replica: ServeProcess, org: str, repo: str) -> None:
    url = f"{replica.url}/github.com/{org}/{repo}/info/refs?service=git-upload-pack"
    async with session.get(url, headers={"User-Agent": "git/2.39.5 (bench)"}) as response:
        body = await response.read()
        if response.status != 200 or b"# service=git-upload-pack" not in body:
            raise RuntimeError(f"info/refs through {replica.url}: HTTP {response.status} {body[:200]!r}")


# ---------------------------------------------------------------- cloning


async def clone(world: World, url: str, destination: Path, expected: str) -> float:
    """Seconds for one `git clone`; the clone must hold the repo it was asked for. Killed after --clone-timeout."""
    watch = Stopwatch()
    process = await asyncio.create_subprocess_exec(
        "git", "clone", "--quiet", url, str(destination), env=world.git_env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    timeout: float = world.args.clone_timeout
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"clone of {url} took over {timeout:.0f}s") from None
    elapsed = watch.seconds
    if process.returncode != 0:
        raise RuntimeError(f"clone of {url} failed ({process.returncode}): {stderr.decode(errors='replace')}")
    found = (destination / "name.txt").read_text()
    if found != expected:
        raise RuntimeError(f"clone of {url} holds {found!r}, expected {expected!r}")
    return elapsed


def plan_clones(world: World, replica_count: int, clones: int) -> list[tuple[int, str, str]]:
    """(replica, org, repo) per clone: replicas round-robin; the org changes every `replica_count` clones, so that
    every replica that gets two clones or more sees more than one installation."""
    plan = []
    for index in range(clones):
        org = world.orgs[(index // replica_count) % len(world.orgs)]
        plan.append((index % replica_count, org, world.repos[index % len(world.repos)]))
    return plan
