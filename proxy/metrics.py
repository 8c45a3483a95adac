"""Metrics: Prometheus counters for requests, bytes, latency and the token cache, labelled by service and entry only."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from .errors import AppNotInstalled, CredentialError, JwtRejected, RateLimited

# Labels are bounded on purpose: services and entry ids come from code and config, never from a repo name or a
# client address, so a scan of random paths cannot blow up the series count.
REFUSED = "refused"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def mint_failure_reason(error: CredentialError) -> str:
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, AppNotInstalled):
        return "not_installed"
    if isinstance(error, JwtRejected):
        return "jwt_rejected"
    return "upstream_error"


class Metrics:
    """One per process, in its own registry (no global state), passed to whoever records something."""

    def __init__(self) -> None:
        # Every counter and histogram would get a `_created` twin holding its creation time: twice the series of a
        # scrape, for a number no alert uses. prometheus_client's switch is process-wide; it is set before the
        # first metric exists, so every registry of the process gets the same exposition.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the library ships it without hints
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The standard process_* series (CPU, resident memory, open fds, start time), as every Python exporter has.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "git_token_proxy_requests", "Requests by git service and status class", ["service", "status_class"],
            registry=r,
        )  # fmt: skip
        self.received_bytes = Counter(
            "git_token_proxy_received_bytes", "Request body bytes received from clients", ["service"], registry=r
        )
        self.sent_bytes = Counter(
            "git_token_proxy_sent_bytes", "Response body bytes sent to clients", ["service"], registry=r
        )
        self.upstream_latency = Histogram(
            "git_token_proxy_upstream_response_seconds", "Time until the upstream's response headers arrived",
            ["service"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("git_token_proxy_requests_in_flight", "Requests being served", registry=r)
        self.cache_hits = Counter(
            "git_token_proxy_token_cache_hits", "Requests served with a cached token", ["entry"], registry=r
        )
        self.cache_misses = Counter(
            "git_token_proxy_token_cache_misses", "Requests that waited for a token to be minted", ["entry"], registry=r
        )
        self.mints = Counter("git_token_proxy_token_mints", "Installation tokens minted", ["entry"], registry=r)
        self.mint_failures = Counter(
            "git_token_proxy_token_mint_failures", "Failed attempts to get a token, by reason", ["entry", "reason"],
            registry=r,
        )  # fmt: skip
        self.mint_latency = Histogram(
            "git_token_proxy_token_mint_seconds", "Time to mint an installation token", ["entry"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.heals = Counter(
            "git_token_proxy_token_heals", "Tokens rejected by upstream (401), evicted and minted anew", ["entry"],
            registry=r,
        )  # fmt: skip
        self.liveness_checks = Counter(
            "git_token_proxy_token_liveness_checks", "Cached tokens checked against GitHub after a 404, by result",
            ["entry", "result"], registry=r,
        )  # fmt: skip
        self.write_stalls = Counter(
            "git_token_proxy_write_stalls", "Transfers aborted because the client stopped reading", registry=r
        )
        self.unexpected_errors = Counter(
            "git_token_proxy_unexpected_errors", "Requests that ended in an unexpected exception (a bug)", registry=r
        )
        # The fleet's shared cache (cache.redis): hits and misses are counted on a local miss or a due refresh only,
        # since a warm request never asks Redis.
        self.shared_cache_hits = Counter(
            "git_token_proxy_shared_cache_hits", "Tokens found in the shared cache (Redis)", registry=r
        )
        self.shared_cache_misses = Counter(
            "git_token_proxy_shared_cache_misses", "Shared cache look-ups that found no usable token", registry=r
        )
        self.shared_cache_errors = Counter(
            "git_token_proxy_shared_cache_errors", "Redis calls that failed or timed out", registry=r
        )
        self.lease_waits = Counter(
            "git_token_proxy_lease_waits", "Times a replica waited for another one's mint", registry=r
        )
        self.lease_wait_seconds = Histogram(
            "git_token_proxy_lease_wait_seconds", "Time spent waiting for another replica's mint",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.redis_available = Gauge(
            "git_token_proxy_redis_available", "1 while the shared cache (Redis) answers, 0 while it is away",
            registry=r,
        )  # fmt: skip
        # The mirror cache (mirror.dir).
        self.mirror_requests = Counter(
            "git_token_proxy_mirror_requests", "Pack requests by how they were answered",
            ["outcome"], registry=r,
        )  # fmt: skip  # outcome: hit (from the mirror), filled (fetched into it first), bypass (upstream)
        self.mirror_fetches = Counter(
            "git_token_proxy_mirror_fetches", "Fetches from upstream into a mirror, by result", ["result"], registry=r
        )
        self.mirror_bytes = Counter(
            "git_token_proxy_mirror_bytes", "Pack bytes sent to clients, by where they came from", ["source"],
            registry=r,
        )  # fmt: skip  # source: mirror or upstream
        self.mirror_evictions = Counter(
            "git_token_proxy_mirror_evictions", "Mirrors evicted to stay under maxSize", registry=r
        )
        self.mirror_disk_bytes = Gauge("git_token_proxy_mirror_disk_bytes", "Disk used by the mirrors", registry=r)
        # Mirror snapshots in object storage (mirror.snapshots).
        self.snapshot_restores = Counter(
            "git_token_proxy_snapshot_restores", "Mirrors started from a snapshot, by result", ["result"], registry=r
        )  # result: restored, missing (none published), refused (foreign, corrupt, too large), failed, skipped
        self.snapshot_publishes = Counter(
            "git_token_proxy_snapshot_publishes", "Snapshot publishes, by result", ["result"], registry=r
        )  # result: published, unchanged, recent, busy, lost_race, too_large, empty, failed
        self.snapshot_restored_bytes = Counter(
            "git_token_proxy_snapshot_restored_bytes", "Snapshot bytes restored from the bucket", registry=r
        )
        self.snapshot_published_bytes = Counter(
            "git_token_proxy_snapshot_published_bytes", "Snapshot bytes uploaded to the bucket", registry=r
        )
        # LFS objects through the proxy (lfs.proxyObjects).
        self.transfers_cut = Counter(
            "git_token_proxy_transfers_cut", "Requests whose answer did not go out whole, by the side that cut it",
            ["side"], registry=r,
        )  # fmt: skip
        self.push_refused = Counter(
            "git_token_proxy_push_refused",
            "Pushes refused by a push policy, before any byte went upstream (reason: ref, create, delete, force, "
            "malformed, undecidable)",
            ["entry", "reason"], registry=r,
        )  # fmt: skip
        self.anonymous_fallbacks = Counter(
            "git_token_proxy_anonymous_fallbacks",
            "Reads sent upstream without a token because the entry's app is not installed there (public repos)",
            ["entry"], registry=r,
        )  # fmt: skip
        self.lfs_actions_rewritten = Counter(
            "git_token_proxy_lfs_actions_rewritten", "Batch-answer actions given a handle on this proxy", ["action"],
            registry=r,
        )  # fmt: skip
        self.lfs_actions_passed = Counter(
            "git_token_proxy_lfs_actions_passed", "Batch-answer actions on hosts that are not storage hosts, passed on",
            registry=r,
        )  # fmt: skip
        self.lfs_action_headers_dropped = Counter(
            "git_token_proxy_lfs_action_headers_dropped",
            "Headers of batch-answer actions not sent to storage (framing, hop-by-hop, or not in the allowlist)",
            registry=r,
        )
        self.lfs_digest_mismatches = Counter(
            "git_token_proxy_lfs_digest_mismatches", "LFS downloads aborted because the bytes did not match the oid",
            registry=r,
        )  # fmt: skip
        self.soonest_expiry = Gauge(
            "git_token_proxy_token_soonest_expiry_seconds", "Seconds until the soonest cached token expires",
            registry=r,
        )  # fmt: skip
        self.soonest_expiry.set_function(lambda: math.nan)

    def watch_token_expiry(self, seconds_until_soonest: Callable[[], float]) -> None:
        self.soonest_expiry.set_function(seconds_until_soonest)

    def mint_failed(self, entry: str, error: CredentialError) -> None:
        self.mint_failures.labels(entry, mint_failure_reason(error)).inc()
