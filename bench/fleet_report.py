"""The fleet bench's report: the experiments' results as one JSON-able dict, and that dict as Markdown."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from bench.common import cpus, percentile
from bench.fleet_experiments import LatencyResult, RoundResult
from proxy.testing.redis import RedisCount


def results(
    args: argparse.Namespace, redis_version: str, orgs: list[str], rounds: list[RoundResult], latency: LatencyResult,
    trips: dict[str, tuple[int, RedisCount]], total_seconds: float,
) -> dict[str, Any]:  # fmt: skip
    summary = {name: summarize(values) for name, values in latency.samples.items()}
    return {
        "setup": {
            "redis_version": redis_version,
            "mint_latency_ms": args.mint_latency * 1000,
            "installations": args.installations,
            "orgs": orgs,
            "repos_per_org": args.repos,
            "clones": args.clones,
            "replica_counts": args.replica_counts,
            "cpus": cpus(),
        },
        "mints": [
            row.as_json() | {"redis": _with_breakdown(row.redis, row.clones) if row.redis else None} for row in rounds
        ],
        "latency": {
            "summary": summary,
            "per_call": {name: count.as_json() for name, count in latency.per_call.items()},
            "added": {
                "p50_us": summary["shared"]["p50_us"] - summary["local"]["p50_us"],
                "p99_us": summary["shared"]["p99_us"] - summary["local"]["p99_us"],
                "source_p50_us": summary["source_fresh"]["p50_us"] - summary["source_warm"]["p50_us"],
                "source_p99_us": summary["source_fresh"]["p99_us"] - summary["source_warm"]["p99_us"],
            },
            "mints_during_samples": latency.mints - 1,
        },
        "round_trips": {name: _with_breakdown(redis_count, count) for name, (count, redis_count) in trips.items()},
        "total_seconds": total_seconds,
    }


def summarize(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_us": percentile(samples, 0.5), "p99_us": percentile(samples, 0.99)}


def _with_breakdown(count: RedisCount, requests: int) -> dict[str, Any]:
    return count.as_json() | {"total": count.total, "breakdown": count.breakdown(), "requests": requests}


LATENCY_LABELS = {
    "local": "`TokenCache.get`, warm: in-process hit",
    "shared": "`TokenCache.get` of a just-started replica: local miss, Redis hit",
    "source_warm": "`GitHubAppSource.get_credential`, warm (installation id and token in-process)",
    "source_fresh": "`GitHubAppSource.get_credential` of a just-started replica: installation id and token from Redis",
    "redis_get": "`RedisStore.get` alone, one GET of an absent key (the loopback floor)",
}
ROUND_TRIP_LABELS = {
    "cold": "info/refs, cold replica, empty Redis (look-up, lease, mint, publish)",
    "cold_replica_warm_redis": "info/refs, cold replica, Redis warm (another replica minted)",
    "warm_info_refs": "info/refs, warm replicas",
    "warm_clones": "git clone, warm replicas",
}


def render(results: Mapping[str, Any]) -> str:
    meta = results["setup"]
    lines = [
        "# git-token-proxy fleet benchmark",
        "",
        f"redis-server {meta['redis_version']} on loopback; fake GitHub in the benchmark's process (real git "
        f"http-backend), mint latency {meta['mint_latency_ms']:.0f} ms; {meta['installations']} installation(s) "
        f"({', '.join(meta['orgs'])}), {meta['repos_per_org']} repos each; {meta['cpus']} CPUs. Percentiles "
        "interpolate linearly between ranks.",
        "",
        *_mints(results),
        "",
        *_latency(results),
        "",
        *_round_trips(results),
        "",
        f"Total wall time {results['total_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def _mints(results: Mapping[str, Any]) -> list[str]:
    meta = results["setup"]
    lines = [
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
    ]
    return lines


def _latency(results: Mapping[str, Any]) -> list[str]:
    latency = results["latency"]
    lines = [
        "## 2. Added latency of a shared-cache hit over an in-process hit (p50 / p99, in-process, µs)",
        "",
        "A just-started replica's credentials come from `build_credentials`, as `create_app` builds them, with their "
        "Redis connection open before the timer starts.",
        "",
        "| lookup | samples | p50 µs | p99 µs | Redis round-trips per call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in LATENCY_LABELS.items():
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
    ]
    return lines


def _round_trips(results: Mapping[str, Any]) -> list[str]:
    lines = [
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
    trips = results["round_trips"]
    rows = [(label, trips[name]) for name, label in ROUND_TRIP_LABELS.items() if name in trips]
    rows += [
        (f"git clone, cold, {row['replicas']} replica(s), {row['clones']} at once (part 1)", row["redis"])
        for row in results["mints"]
        if row["redis"]
    ]
    for label, row in rows:
        count, round_trips = row["requests"], row["round_trips"]
        lines.append(
            f"| {label} | {count} | {row['total']} | {row['in_scripts']} | {row['connection_setup']} | {round_trips} "
            f"| {round_trips / count:.2f} | {row['breakdown']} |"
        )
    return lines
