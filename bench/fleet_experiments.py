"""The fleet bench's three experiments: mints when N replicas take M cold clones at once, the latency a shared-cache
hit adds in process, and the Redis round-trips per request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.common import Stopwatch, log, timed_us
from bench.fleet_world import ENTRY, World, api_calls, clone, info_refs, plan_clones, replicas, scrape
from proxy.app import build_api_session, build_credentials
from proxy.config import Config, parse_config
from proxy.credentials import CachedToken, Credential
from proxy.credentials.github_app import GitHubAppSource
from proxy.metrics import Metrics
from proxy.routing import RepoRef
from proxy.running import Credentials, SharedTier
from proxy.testing.redis import RedisCount

REQUEST_TIMEOUT = 30.0  # seconds for one info/refs request

# ---------------------------------------------------------------- 1. cold clones over N replicas


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
        watch = Stopwatch()
        seconds = await asyncio.gather(
            *(
                clone(world, f"{started[r].url}/github.com/{org}/{repo}", folder / f"clone-{i}", f"{org}/{repo}")
                for i, (r, org, repo) in enumerate(plan)
            )
        )
        wall = watch.seconds
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


# ---------------------------------------------------------------- 2. in-process latency


@dataclass
class LatencyResult:
    samples: dict[str, list[float]]  # µs per call, by kind of look-up
    per_call: dict[str, RedisCount]  # what one call of each kind made Redis do
    mints: int  # during the whole experiment, the one cold call included


async def must_not_mint() -> CachedToken:
    raise RuntimeError("the benchmark expected a cache hit, and the cache asked for a mint")


def shared_tier(credentials: Credentials) -> SharedTier:
    if credentials.shared is None:
        raise RuntimeError("the config has no cache.redis")
    return credentials.shared


def app_source(credentials: Credentials) -> GitHubAppSource:
    source = credentials.sources[ENTRY]
    if not isinstance(source, GitHubAppSource):
        raise RuntimeError(f"entry {ENTRY!r} is not a GitHub App entry")
    return source


@contextlib.asynccontextmanager
async def just_started(
    config: Config, metrics: Metrics, api_session: aiohttp.ClientSession
) -> AsyncIterator[Credentials]:
    """The credentials of a replica that just started (built by `build_credentials`, as `create_app` builds them):
    empty in-process caches, the same Redis. Its connection to Redis is opened before anything is timed, as a
    running replica's is."""
    credentials = await build_credentials(config, metrics, api_session)
    try:
        await shared_tier(credentials).store.ping()
        yield credentials
    finally:
        await credentials.close()


async def lookup_latency(world: World) -> LatencyResult:
    """The proxy's own classes (TokenCache, SharedTokens, Sealer, RedisStore, GitHubAppSource), built by
    `build_credentials` in this process, against the benchmark's redis-server."""
    args = world.args
    config = parse_config(world.config(True, key_prefix="bench-in-process"))
    metrics = Metrics()
    repo = RepoRef("github.com", world.orgs[0], world.repos[0])
    samples: dict[str, list[float]] = {
        "local": [], "shared": [], "source_warm": [], "source_fresh": [], "redis_get": [],
    }  # fmt: skip
    per_call: dict[str, RedisCount] = {}
    async with build_api_session(config) as api_session, just_started(config, metrics, api_session) as warm:
        fresh = functools.partial(just_started, config, metrics, api_session)
        source = app_source(warm)
        mints_before = world.fake.apps.count("mint")
        first: Credential = await source.get_credential(repo)  # cold: look-up and mint, published to Redis
        key = source.token_key(await source.installation_for(repo), repo)

        local_hit = functools.partial(warm.tokens.get, key, must_not_mint)
        warm_source = functools.partial(source.get_credential, repo)
        redis_get = functools.partial(shared_tier(warm).store.get, "bench:absent")

        async def counted(name: str, call: Callable[[], Awaitable[Any]]) -> None:
            """One call, counted in Redis (connections are open by now)."""
            before = world.meter.snapshot()
            got = await call()
            per_call[name] = world.meter.since(before)
            if isinstance(got, Credential) and got.token != first.token:
                raise RuntimeError(f"{name}: a different token than the one minted")

        await counted("local", local_hit)
        async with fresh() as replica:
            await counted("shared", functools.partial(replica.tokens.get, key, must_not_mint))
        await counted("source_warm", warm_source)
        async with fresh() as replica:
            await counted("source_fresh", functools.partial(app_source(replica).get_credential, repo))
        await counted("redis_get", redis_get)

        log(f"  {args.samples} shared-hit samples, {args.samples * args.local_per_sample} local-hit samples ...")
        # Interleaved, so that drift (CPU clocks, other processes) touches every kind alike. What is built for a
        # sample (a just-started replica) is built before its timer starts.
        for _ in range(args.samples):
            async with fresh() as replica:
                samples["shared"].append(await timed_us(functools.partial(replica.tokens.get, key, must_not_mint)))
            async with fresh() as replica:
                samples["source_fresh"].append(
                    await timed_us(functools.partial(app_source(replica).get_credential, repo))
                )
            samples["redis_get"].append(await timed_us(redis_get))
            for _ in range(args.local_per_sample):
                samples["local"].append(await timed_us(local_hit))
                samples["source_warm"].append(await timed_us(warm_source))
        mints = world.fake.apps.count("mint") - mints_before
    return LatencyResult(samples, per_call, mints)


# ---------------------------------------------------------------- 3. round-trips per request


async def round_trips(world: World) -> dict[str, tuple[int, RedisCount]]:
    """Two replicas on an emptied Redis: A's first request (everything cold), B's first (Redis warm, B cold),
    then warm info/refs requests and warm clones on both. (requests, Redis work) by kind of request."""
    args = world.args
    world.redis.command("FLUSHALL")
    folder = world.workdir / "round-trips"
    org, repo = world.orgs[0], world.repos[0]
    rows: dict[str, tuple[int, RedisCount]] = {}
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
