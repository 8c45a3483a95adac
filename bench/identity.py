"""What a signed client identity costs per request: the proxy's CPU for warm info/refs requests with a static
client token, with a JWT it has verified before (git sends the same token with every request of an operation), and
with a JWT it sees for the first time, taking turns in batches. Measured on the proxy process (/proc), as
`python -m bench` measures it.

    python -m bench.identity [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.clone import REPO, build_big_repo, cpu_seconds, fake_github_server, token_proxy_server
from bench.common import in_scratch, log, print_report
from proxy.access.grants import grant, jwks_document

ISSUER = "https://orchestrator.bench.invalid"
STATIC_TOKEN = "a-static-client-token-0001"
KINDS = ("static token", "JWT, verified before", "JWT, first sight")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.identity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per kind (default 5000)")
    parser.add_argument("--batches", type=int, default=5, help="the kinds take turns this many times")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"x:{password}".encode()).decode()


async def cpu_per_request(url: str, pid: int, headers: list[str]) -> float:
    """The proxy's CPU µs per request, over keep-alive connections, eight at a time."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:

        async def one(authorization: str) -> None:
            async with session.get(url, headers={"Authorization": authorization}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {(await response.text())[:200]}")

        await one(headers[0])  # the connections open outside the measurement
        before = cpu_seconds(pid) or 0.0
        for start in range(0, len(headers), 8):
            await asyncio.gather(*(one(header) for header in headers[start : start + 8]))
        return ((cpu_seconds(pid) or 0.0) - before) / len(headers) * 1e6


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    build_big_repo(scratch / "github", 1, 1)
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = scratch / "issuer.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    jwks_file = scratch / "issuer.jwks.json"
    jwks_file.write_text(json.dumps(jwks_document(key_file)))
    access = {
        "clients": [{"name": "static", "token": STATIC_TOKEN, "repos": [".*"]}],
        "issuers": [{"name": "bench", "issuer": ISSUER, "audience": "git-token-proxy", "jwksFile": str(jwks_file),
                     "repos": [".*"]}],
    }  # fmt: skip

    def token(sub: str) -> str:
        return grant(key_file, issuer=ISSUER, audience="git-token-proxy", subject=sub, ttl=3600)

    warm = basic(token("sandbox-warm"))
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with (
        fake_github_server(scratch / "github", scratch) as fake,
        token_proxy_server(fake.url, scratch, access=access) as proxy,
    ):
        url = f"{proxy.url}/github.com/{REPO}.git/info/refs?service=git-upload-pack"
        per_batch = args.requests // args.batches
        for batch in range(args.batches):
            # As many as the other kinds: /proc counts CPU in 10 ms ticks, so a batch must be long to be read.
            fresh = [basic(token(f"sandbox-{batch}-{n}")) for n in range(per_batch)]
            for kind, headers in (
                ("static token", [basic(STATIC_TOKEN)] * per_batch),
                ("JWT, verified before", [warm] * per_batch),
                ("JWT, first sight", fresh),
            ):
                value = asyncio.run(cpu_per_request(url, proxy.pid, headers))
                results[kind].append(value)
                log(f"  batch {batch + 1}/{args.batches}  {kind:<22} {value:8.1f} µs CPU per request")
    medians = {kind: statistics.median(values) for kind, values in results.items()}
    return {
        "requests": args.requests,
        "cpu_us": medians,
        "jwt_warm_extra_us": medians["JWT, verified before"] - medians["static token"],
        "jwt_first_extra_us": medians["JWT, first sight"] - medians["static token"],
    }


def render(results: Mapping[str, Any]) -> str:
    lines = [
        f"`python -m bench.identity`: warm info/refs through the proxy, {results['requests']} requests per kind in "
        "batches taking turns; the proxy's CPU per request (/proc), medians of the batches.",
        "",
        "| client credential | proxy CPU µs per request | more than a static token |",
        "|---|---|---|",
    ]
    static = results["cpu_us"]["static token"]
    for kind, value in results["cpu_us"].items():
        extra = "—" if kind == "static token" else f"{value - static:+.0f} µs"
        lines.append(f"| {kind} | {value:.0f} | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = in_scratch("bench-identity-", lambda scratch: benchmark(args, scratch))
    print_report(results, args.json, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
