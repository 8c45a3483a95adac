"""Benchmark: the cost of a warm token lookup (the per-request hot path) next to a cold mint, in one run.

Run: python -m bench.token_lookup [--lookups 200000]
The seed's figures for Concord: minting 250-500 ms against GitHub, a cached token under 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import Stopwatch, percentile
from proxy.app import build_api_session, build_credentials
from proxy.config import parse_config
from proxy.credentials import Credential
from proxy.credentials.github_app import GitHubAppSource
from proxy.metrics import Metrics
from proxy.routing import RepoRef
from proxy.testing.harness import build_fake, proxy_config

Lookup = Callable[[RepoRef], Awaitable[Credential]]


async def measure(lookups: int) -> None:
    report(*await figures(lookups))


async def figures(lookups: int) -> tuple[float, list[float], list[float], int]:
    """Cold mint (ms), warm App-token and static-token lookups (ns per call, one figure per batch of 1000), and
    the number of mints the fake saw."""
    with tempfile.TemporaryDirectory() as tmp:
        fake, app, key_file = build_fake(Path(tmp), {"acme/app": {"README.md": b"app\n"}})
        await fake.start()
        config_data = proxy_config(fake.url, app, key_file, id="bench", urlPattern=r"(?<baseUrl>github\.com)/acme/.*")
        static = {"id": "static", "type": "OAUTH_TOKEN", "urlPattern": r"(?<baseUrl>github\.com)/.*", "token": "t"}
        config_data["github"]["appInstallation"]["auth"].append(static)
        config = parse_config(config_data)
        try:
            async with build_api_session(config) as session:
                credentials = await build_credentials(config, Metrics(), session)
                try:
                    app_source = credentials.sources["bench"]
                    assert isinstance(app_source, GitHubAppSource)
                    repo = RepoRef("github.com", "acme", "app")

                    watch = Stopwatch()
                    await app_source.get_credential(repo)  # cold: JWT, installation look-up, mint
                    cold_ms = watch.ms

                    warm = await time_lookups(app_source.get_credential, repo, lookups)
                    static_times = await time_lookups(credentials.sources["static"].get_credential, repo, lookups)
                finally:
                    await credentials.close()
        finally:
            await fake.close()
    return cold_ms, warm, static_times, fake.apps.count("mint")


async def time_lookups(lookup: Lookup, repo: RepoRef, count: int) -> list[float]:
    """Per-call nanoseconds, measured in batches of 1000 so the timer's own cost is spread out."""
    batch, per_call = 1000, []
    for _ in range(count // batch):
        watch = Stopwatch()
        for _ in range(batch):
            await lookup(repo)
        per_call.append(watch.us * 1000 / batch)
    return per_call


def report(cold_ms: float, warm: list[float], static: list[float], mints: int) -> None:
    warm_us = statistics.median(warm) / 1000
    print(f"cold (JWT + installation look-up + mint, local fake GitHub): {cold_ms:8.2f} ms")
    print(f"warm GitHub App token lookup, median of batches:          {warm_us:8.2f} us"
          f"  (p95 {percentile(warm, 0.95) / 1000:.2f} us)")  # fmt: skip
    print(f"static token lookup, median of batches:                   {statistics.median(static) / 1000:8.2f} us")
    print(f"mints during {len(warm) * 1000} warm lookups: {mints - 1}")
    print(f"seed (Concord): cached < 1 ms, mint 250-500 ms -> warm lookup here is {1000 / warm_us:,.0f}x under 1 ms,")
    print(f"and {250_000 / warm_us:,.0f}x to {500_000 / warm_us:,.0f}x cheaper than a mint against GitHub")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=200_000)
    asyncio.run(measure(parser.parse_args().lookups))


if __name__ == "__main__":
    main()
