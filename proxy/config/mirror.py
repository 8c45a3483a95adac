"""Mirror: the local bare mirror per repo that answers repeat clones."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from .base import Model
from .units import PositiveDuration, PositiveSize

MAX_SINGLE_PUT = 5 * (1 << 30)  # S3's limit for one PUT; larger repos are not snapshotted
MAX_RESTORE_TIMEOUT = 3600.0
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_REGION = re.compile(r"[a-z0-9-]{1,40}")


class SnapshotsConfig(Model):
    """mirror.snapshots: where the fleet keeps its snapshots. Credentials come from the standard AWS chain
    (environment, shared files, IRSA / pod identity, instance metadata): never from this file."""

    url: str  # s3://bucket/prefix
    endpoint: str | None = None  # anything S3-compatible: http(s)://host[:port], addressed path-style
    region: str | None = None
    publish: bool = True  # false: this replica only restores (its identity may then be read-only)
    publish_every: PositiveDuration = 3600.0  # per repo, across the fleet
    max_snapshot_size: PositiveSize = Field(default=4 * (1 << 30), le=MAX_SINGLE_PUT)
    # A restore taking longer is given up: the fill goes upstream. At most an hour (see GARBAGE_AFTER).
    restore_timeout: PositiveDuration = Field(default=300.0, le=MAX_RESTORE_TIMEOUT)

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        if not url.startswith("s3://"):
            raise ValueError("must be s3://<bucket>/<prefix>")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
        parts = prefix.removesuffix("/").split("/") if prefix.strip("/") else []
        if len(prefix) > 512 or not all(_PREFIX_PART.fullmatch(p) and p not in (".", "..") for p in parts):
            raise ValueError("the key prefix may hold only segments of A-Z, a-z, 0-9, '_', '.', '-' (no '..')")
        return url

    @field_validator("endpoint")
    @classmethod
    def _valid_endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be http(s)://host[:port]")
        if parts.username or parts.password:
            raise ValueError("credentials never go in the config: use the standard AWS chain (environment, files)")
        if parts.path not in ("", "/"):
            raise ValueError("must be http(s)://host[:port], without a path")
        parts.port  # noqa: B018  # raises ValueError on a port out of range
        return endpoint.removesuffix("/")

    @field_validator("region")
    @classmethod
    def _valid_region(cls, region: str | None) -> str | None:
        if region is not None and not _REGION.fullmatch(region):
            raise ValueError("not an AWS region name (e.g. us-east-1)")
        return region

    @property
    def bucket(self) -> str:
        return self.url.removeprefix("s3://").partition("/")[0]

    @property
    def prefix(self) -> str:
        return self.url.removeprefix("s3://").partition("/")[2].strip("/")


class MirrorConfig(Model):
    """Repeat clones come from a local bare mirror per repo; refs and authorization still come from upstream."""

    dir: Path  # one bare mirror per upstream repo under it, laid out by host/owner/repo
    max_size: PositiveSize = 10 * (1 << 30)  # LRU eviction of whole repos
    repos: list[str] = Field(
        default_factory=list
    )  # regexes like access.clients' repos, matched against host/owner/repo; empty: every repo
    # A pack is served from the mirror only while an upstream answer less than this old proves that the credential
    # can read the repo (and no refusal came since); otherwise upstream is asked first.
    auth_ttl: PositiveDuration = 60.0
    # Pack requests are read whole so that the mirror can answer them; all of them together hold at most this much.
    # One that does not fit (or is over 16 MiB, or slow) goes upstream as it comes, as it would without a mirror.
    max_held_bodies: PositiveSize = 64 * (1 << 20)
    # Snapshots in S3-compatible storage: a replica with an empty dir starts from the fleet's newest snapshot.
    snapshots: SnapshotsConfig | None = None
