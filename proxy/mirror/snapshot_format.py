"""What a mirror snapshot is in the bucket: where one repo's snapshots live (its namespace), the manifest that makes
one visible and what it must be bound to, and the header of the git bundle it names.

Layout, under the configured prefix, per mirror key (host/owner/repo with the baseUrl path folded in, so one
namespace per upstream path): `v1/<digest of the key>/manifest.json`, `.../bundles/<time>-<random>.bundle`, and
`.../publishing.lock`. Nothing of a URL or a repo name reaches a key: the manifest names the repo inside, and a
manifest or bundle found under another namespace's key is refused ("bind it to what it claims to be").
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_MANIFEST = 64 * 1024
# The bundle's header lists every ref (GitHub's refs/pull/* included: ~60 bytes each). It is held in memory while
# it is read, so it has a bound; a repo with more refs than fit is simply not restored from a snapshot.
MAX_BUNDLE_HEADER = 16 * (1 << 20)

_BUNDLE_SIGNATURE = b"# v2 git bundle"
_REF_LINE = re.compile(rb"([0-9a-f]{40}) (\S{1,4096})")
_BUNDLE_NAME = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}\.bundle")
_HEX64 = r"^[0-9a-f]{64}$"


class SnapshotRefused(Exception):
    """The snapshot is not used: foreign, corrupt, truncated, too large, or refused by git."""


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Namespace:
    """Where one mirror key's snapshots live: a digest of the key under the prefix, and only that."""

    key: str
    id: str
    root: str

    @classmethod
    def of(cls, prefix: str, key: str) -> Namespace:
        digest = hashlib.sha256(b"git-token-proxy snapshot namespace\n" + key.encode()).hexdigest()[:32]
        return cls(key, digest, f"{prefix}/v1/{digest}/" if prefix else f"v1/{digest}/")

    @property
    def manifest_key(self) -> str:
        return f"{self.root}manifest.json"

    @property
    def lock_key(self) -> str:
        return f"{self.root}publishing.lock"

    @property
    def bundles(self) -> str:
        return f"{self.root}bundles/"

    def new_bundle_key(self) -> str:
        return f"{self.bundles}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(8)}.bundle"

    def owns(self, object_key: str) -> bool:
        return object_key.startswith(self.bundles) and bool(_BUNDLE_NAME.fullmatch(object_key[len(self.bundles) :]))


# ---------------------------------------------------------------- the manifest


class Manifest(BaseModel):
    """The small JSON object that makes a snapshot visible: written last, it names the repo and its bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1]
    format: Literal["git-bundle-v2"]
    repo_key: str = Field(max_length=512)
    namespace: str = Field(pattern=r"^[0-9a-f]{32}$")
    object_key: str = Field(max_length=1024)
    size: int = Field(gt=0)
    sha256: str = Field(pattern=_HEX64)
    refs_digest: str = Field(pattern=_HEX64)
    created: float  # the publisher's clock, seconds since the epoch

    def binds(self, namespace: Namespace) -> bool:
        """True when it is what it claims to be: this repo's, under this namespace, naming a bundle beside it."""
        return (self.repo_key == namespace.key and self.namespace == namespace.id
                and namespace.owns(self.object_key) and math.isfinite(self.created))  # fmt: skip

    def age(self) -> float:
        """Seconds since it was written; a date in the future (a skewed or hostile clock) counts as very old."""
        age = time.time() - self.created
        return age if age >= -300.0 else math.inf


def parse_manifest(data: bytes, namespace: Namespace) -> Manifest | None:
    """The manifest in `data` if it is well formed and bound to `namespace`; None for anything else."""
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError:
        return None
    return manifest if manifest.binds(namespace) else None


def refs_digest(refs: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(sorted(f"{oid} {name}\n" for oid, name in refs)).encode()).hexdigest()


# ---------------------------------------------------------------- the bundle's header


def parse_bundle_header(header: bytes) -> list[tuple[str, str]]:
    """The refs (id, name) of a full v2 bundle's header (the lines before the blank one). HEAD is left out; an
    incremental bundle (prerequisites), a name outside refs/ or a malformed line is refused."""
    signature, *lines = header.split(b"\n")
    if signature != _BUNDLE_SIGNATURE:
        raise SnapshotRefused("not a v2 git bundle")
    refs = []
    for line in lines:
        if line.startswith(b"-"):
            raise SnapshotRefused("an incremental bundle (it has prerequisites)")
        match = _REF_LINE.fullmatch(line)
        if match is None:
            raise SnapshotRefused("a bundle header line that is not '<id> <ref>'")
        try:
            name = match.group(2).decode()
        except UnicodeDecodeError:
            raise SnapshotRefused("a ref name that is not UTF-8") from None
        if name != "HEAD":
            if not name.startswith("refs/"):
                raise SnapshotRefused("a ref outside refs/")
            refs.append((match.group(1).decode(), name))
    if not refs:
        raise SnapshotRefused("a bundle without refs")
    return refs


class BundleHeaderReader:
    """Collects a bundle's header from the first chunks; `feed` returns what follows it (the pack) once complete."""

    def __init__(self) -> None:
        self._seen = bytearray()
        self.refs: list[tuple[str, str]] | None = None

    def feed(self, chunk: bytes) -> bytes | None:
        searched = max(len(self._seen) - 1, 0)  # each byte is looked at once, however small the chunks
        self._seen += chunk
        end = self._seen.find(b"\n\n", searched)
        if end < 0:
            if len(self._seen) > MAX_BUNDLE_HEADER:
                raise SnapshotRefused(f"a bundle header over {MAX_BUNDLE_HEADER} bytes")
            return None
        self.refs = parse_bundle_header(bytes(self._seen[:end]))
        rest = bytes(self._seen[end + 2 :])
        self._seen = bytearray()
        return rest
