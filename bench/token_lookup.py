"""Benchmark: the cost of a warm token lookup (the per-request hot path) next to a cold mint, in one run.

Run: python bench/token_lookup.py [--lookups 200000]
The seed's figures for Concord: minting 250-500 ms against GitHub, a cached token under 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from proxy.app import build_api_session, build_credential_sources, build_token_cache, load_app_keys
from proxy.config import parse_config
from proxy.credentials.github_app import GitHubAppSource
from proxy.metrics import Metrics
from proxy.routing import RepoRef
from proxy.testing import FakeGitHub, generate_app_key, pkcs1_pem


async def measure(lookups: int) -> None:
    report(*await figures(lookups))


async def figures(lookups: int) -> tuple[float, list[float], list[float], int]:
    """Cold mint (ms), warm App-token and static-token lookups (ns per call, one figure per batch of 1000), and
    the number of mints the fake saw."""
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeGitHub(root=Path(tmp) / "github")
        key = generate_app_key()
        app = fake.apps.add_app(key)
        fake.apps.add_installation(app, "acme")
        (Path(tmp) / "key.pem").write_text(pkcs1_pem(key))
        await fake.start()
        config = parse_config({
            "upstreams": [{"host": "github.com", "url": fake.url}],
            "github": {"appInstallation": {"auth": [
                {"id": "bench", "type": "GITHUB_APP_INSTALLATION", "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
                 "apiUrl": fake.url, "clientId": app.client_id, "privateKey": str(Path(tmp) / "key.pem")},
                {"id": "static", "type": "OAUTH_TOKEN", "urlPattern": r"(?<baseUrl>github\.com)/.*", "token": "t"},
            ]}},
        })  # fmt: skip
        try:
            async with build_api_session(config) as session:
                keys = load_app_keys(config)
                sources = build_credential_sources(config, session, keys, build_token_cache(config), Metrics())
                app_source = sources["bench"]
                assert isinstance(app_source, GitHubAppSource)
                repo = RepoRef("github.com", "acme", "app")

                started = time.perf_counter()
                await app_source.get_credential(repo)  # cold: JWT, installation look-up, mint
                cold_ms = (time.perf_counter() - started) * 1000

                warm = await time_lookups(app_source.get_credential, repo, lookups)
                static = await time_lookups(sources["static"].get_credential, repo, lookups)
        finally:
            await fake.close()
    return cold_ms, warm, static, fake.apps.count("mint")


async def time_lookups(lookup, repo: RepoRef, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Per-call nanoseconds, measured in batches of 1000 so the timer's own cost is spread out."""
    batch, per_call = 1000, []
    for _ in range(count // batch):
        started = time.perf_counter_ns()
        for _ in range(batch):
            await lookup(repo)
        per_call.append((time.perf_counter_ns() - started) / batch)
    return per_call


def report(cold_ms: float, warm: list[float], static: list[float], mints: int) -> None:
    warm_us = statistics.median(warm) / 1000
    print(f"cold (JWT + installation look-up + mint, local fake GitHub): {cold_ms:8.2f} ms")
    print(f"warm GitHub App token lookup, median of batches:          {warm_us:8.2f} us"
          f"  (p95 {sorted(warm)[int(len(warm) * 0.95)] / 1000:.2f} us)")  # fmt: skip
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
