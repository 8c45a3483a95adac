"""Mirror snapshots in S3-compatible object storage: a replica with an empty mirror starts a repo from the newest
snapshot (a git bundle, checked by its manifest's sha256 and by git) and fetches the rest from upstream; replicas
that fill a mirror publish one, at most every `publishEvery` per repo, one publisher at a time across the fleet.

A snapshot never widens what a client can read: it only saves the bytes of the first fetch. The fill that restores
one still fetches from upstream with the request's credential (no mirror is installed if that fetch fails), refs
come from upstream, and a pack leaves the mirror only under `proof`, exactly as without snapshots.

Layout, under the configured prefix, per mirror key (host/owner/repo with the baseUrl path folded in, so one
namespace per upstream path): `v1/<digest of the key>/manifest.json`, `.../bundles/<time>-<random>.bundle`, and
`.../publishing.lock`. Nothing of a URL or a repo name reaches a key: the manifest names the repo inside, and a
manifest or bundle found under another namespace's key is refused ("bind it to what it claims to be").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..bounded import BoundedDict
from ..config.mirror import MAX_RESTORE_TIMEOUT, SnapshotsConfig
from ..subprocesses import reap
from .gitrun import MirrorGit, describe_failure
from .objectstore import ObjectInfo, ObjectMissing, ObjectStore, ObjectStoreError, PreconditionFailed
from .store import MirrorSlot, MirrorStore

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger("git_token_proxy.snapshots")

MAX_MANIFEST = 64 * 1024
# The bundle's header lists every ref (GitHub's refs/pull/* included: ~60 bytes each). It is held in memory while
# it is read, so it has a bound; a repo with more refs than fit is simply not restored from a snapshot.
MAX_BUNDLE_HEADER = 16 * (1 << 20)
BREAK_FOR = 30.0  # after the bucket failed a restore, fills go straight upstream this long (one probe after it)
PUBLISH_TIMEOUT = 1800.0  # a publish of up to 5 GiB (bundle, hash, upload) never takes longer than this
LEASE_SECONDS = PUBLISH_TIMEOUT + 60.0  # so a lease always outlives the publish that holds it
RETRY_FAILED_PUBLISH = 300.0  # a publish that failed is tried again after the next fill this much later at the earliest
# An unreferenced bundle is deleted once this old: longer than any restore that may still be reading it (it read the
# previous manifest) and any publisher that uploaded it but has not yet written its manifest.
GARBAGE_AFTER = 2 * max(MAX_RESTORE_TIMEOUT, LEASE_SECONDS)
DISK_MARGIN = 64 * (1 << 20)
QUIET_WAIT = 60.0  # a publish waits at most this long for the requests reading its mirror to end

_BUNDLE_SIGNATURE = b"# v2 git bundle"
_REF_LINE = re.compile(rb"([0-9a-f]{40}) (\S{1,4096})")
_BUNDLE_NAME = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16}\.bundle")
_HEX64 = r"^[0-9a-f]{64}$"

PublishResult = Literal["published", "unchanged", "recent", "busy", "lost_race", "too_large", "empty", "failed"]
RestoreResult = Literal["restored", "missing", "refused", "failed", "skipped"]


# ---------------------------------------------------------------- what the rest of the proxy hands in


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _LabelledCounter(Protocol):
    def labels(self, *values: str) -> _Counter: ...


class SnapshotMetrics(Protocol):
    """The counters `proxy.metrics.Metrics` carries for snapshots."""

    @property
    def snapshot_restores(self) -> _LabelledCounter: ...  # {result}: RestoreResult

    @property
    def snapshot_publishes(self) -> _LabelledCounter: ...  # {result}: PublishResult

    @property
    def snapshot_restored_bytes(self) -> _Counter: ...

    @property
    def snapshot_published_bytes(self) -> _Counter: ...


class _Lease(Protocol):
    @property
    def owner(self) -> str | None: ...

    @property
    def holder(self) -> str | None: ...


class FleetLeases(Protocol):
    """The fleet's lease (credentials.shared.SharedStore, i.e. Redis when cache.redis is set)."""

    @property
    def available(self) -> bool: ...

    async def lease(self, key: str, ttl: float, take_from: str | None = None) -> _Lease: ...

    async def release(self, key: str, owner: str) -> None: ...


@dataclass(frozen=True)
class RestoredSnapshot:
    """A mirror built from a snapshot, still in its incoming directory, with the snapshot's refs. The caller fetches
    from upstream into it; the mirror is clean (CLEAN_MARK) only if `clean` and every tip is still reachable from
    the refs upstream gave."""

    tips: list[str]
    clean: bool  # its pack holds exactly what its refs reach
    size: int


class SnapshotRefused(Exception):
    """The snapshot is not used: foreign, corrupt, truncated, too large, or refused by git."""


# ---------------------------------------------------------------- layout and manifest


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


def refs_digest(refs: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(sorted(f"{oid} {name}\n" for oid, name in refs)).encode()).hexdigest()


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


class _HeaderReader:
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


# ---------------------------------------------------------------- the snapshots of one process


class Snapshots:
    """One per process with mirror.snapshots. `restore` is what a fill calls instead of starting from nothing;
    `note_filled` is told after every fill and refresh and publishes in the background. Neither ever raises."""

    def __init__(
        self, settings: SnapshotsConfig, store: ObjectStore, git: MirrorGit, mirrors: MirrorStore,
        metrics: SnapshotMetrics, mirror_max_size: int, leases: FleetLeases | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self._store = store
        self._git = git
        self._mirrors = mirrors
        self._metrics = metrics
        self._max_size = min(settings.max_snapshot_size, mirror_max_size)
        self._leases = leases
        self._outgoing = mirrors.root / "snapshots"  # bundles being published; emptied when the first one starts
        self._outgoing_ready = False
        self._restores = _Health("restores")
        self._publishes = _Health("publishes")
        self._refused: BoundedDict[tuple[str, str], str] = BoundedDict(10_000)  # (key, sha256) -> why
        self._publishing: dict[str, asyncio.Task[PublishResult]] = {}
        # A publish reads the whole mirror and uploads it: one at a time, whatever the number of repos filled.
        self._one_publish_at_a_time = asyncio.Semaphore(1)
        self._next_publish_at: BoundedDict[str, float] = BoundedDict(100_000)
        self.where = f"s3://{settings.bucket}/{settings.prefix}"

    async def prepare(self) -> None:
        """At start-up, in the background: the S3 client is built (about half a second) before the first restore
        needs it. Never raises: a bucket that is away shows on the first restore."""
        with contextlib.suppress(ObjectStoreError):
            await self._store.open()

    def namespace(self, key: str) -> Namespace:
        return Namespace.of(self.settings.prefix, key)

    # ------------------------------------------------------------ restore

    async def restore(self, key: str, incoming: Path) -> RestoredSnapshot | None:
        """Build the mirror of `key` at `incoming` (which must not exist) from its newest snapshot. None when there
        is none or anything is wrong with it or the bucket: `incoming` is then left absent, for a fill from
        nothing. Bounded by restoreTimeout, maxSnapshotSize, the mirror's maxSize and the free disk."""
        restored: RestoredSnapshot | None = None
        result: RestoreResult = "failed"
        try:
            if not self._restores.usable:
                result = "skipped"
            else:
                async with asyncio.timeout(self.settings.restore_timeout):
                    restored = await self._restore(self.namespace(key), incoming)
                result = "restored"
                self._restores.succeeded(self.where)
                self._metrics.snapshot_restored_bytes.inc(restored.size)
                log.info("mirror of %s restored from a snapshot (%d bytes)", key, restored.size)
        except ObjectMissing:
            log.debug("no snapshot of %s in %s", key, self.where)
            result = "missing"
        except SnapshotRefused:
            result = "refused"
        except (ObjectStoreError, TimeoutError, OSError) as error:
            self._restores.failed(_describe(error), breaks=not isinstance(error, OSError))
        except Exception:  # a bug: the clone still goes on, from upstream
            log.exception("snapshot of %s: restore failed unexpectedly", key)
        finally:
            if restored is None:
                await asyncio.to_thread(shutil.rmtree, incoming, True)
        self._metrics.snapshot_restores.labels(result).inc()
        return restored

    async def _restore(self, namespace: Namespace, incoming: Path) -> RestoredSnapshot:
        data, _ = await self._store.read_small(namespace.manifest_key, MAX_MANIFEST)
        manifest = _parse_manifest(data, namespace)
        if manifest is None:
            raise self._refuse(namespace.key, f"manifest {hashlib.sha256(data).hexdigest()}",
                               "its manifest is malformed, or names another repo or bundle")  # fmt: skip
        why = self._refused.get((namespace.key, manifest.sha256))
        if why is not None:
            raise SnapshotRefused(why)  # logged when it was first refused; not downloaded again
        if manifest.size > self._max_size:
            raise self._refuse(namespace.key, manifest.sha256, f"{manifest.size} bytes, over the {self._max_size}"
                               " allowed (maxSnapshotSize, mirror.maxSize)")  # fmt: skip
        await self._mirrors.prepare()
        free = (await asyncio.to_thread(shutil.disk_usage, incoming.parent)).free
        if free < manifest.size + manifest.size // 8 + DISK_MARGIN:
            raise OSError(f"{free} bytes free on the mirror's disk, too few for a {manifest.size}-byte snapshot")
        done = await self._git.init_bare(incoming)
        if done.returncode != 0:
            raise OSError(f"git init failed ({describe_failure(done)})")
        try:
            refs = await self._unpack(manifest, incoming)
        except SnapshotRefused as refused:
            raise self._refuse(namespace.key, manifest.sha256, str(refused)) from None
        if refs_digest(refs) != manifest.refs_digest:
            raise self._refuse(namespace.key, manifest.sha256, "its refs are not the ones its manifest names")
        return await self._install_refs(namespace.key, manifest, incoming, refs)

    async def _unpack(self, manifest: Manifest, incoming: Path) -> list[tuple[str, str]]:
        """Streams the bundle into `git index-pack --strict` as it arrives (no copy on disk, and the download and
        the indexing overlap), hashing it on the way. git checks every object (its id is the hash of what it
        holds) and that the pack is complete; the sha256 and size are then compared with the manifest's."""
        digest, header = hashlib.sha256(), _HeaderReader()
        indexing: _IndexPack | None = None
        try:
            async with self._bundle(manifest) as (info, chunks):
                if info.size != manifest.size:
                    raise SnapshotRefused(f"the bundle holds {info.size} bytes, its manifest says {manifest.size}")
                async for chunk in chunks:
                    if indexing is not None:
                        fed = await indexing.feed(chunk, digest)
                    else:
                        digest.update(chunk)  # the header's chunks: one or a few
                        data = header.feed(chunk)
                        if data is None:
                            continue
                        indexing = await _IndexPack.start(incoming, manifest.size, self._git.env())
                        fed = await indexing.feed(data)
                    if not fed:
                        break  # index-pack gave up: its exit status says why
            if indexing is None or header.refs is None:
                raise SnapshotRefused("the bundle ends inside its header")
            said = await indexing.finish()
            if said is not None:
                raise SnapshotRefused(f"git index-pack refused it ({said})")
            if digest.hexdigest() != manifest.sha256:
                raise SnapshotRefused("its sha256 is not the one its manifest names (corrupt or replaced)")
            return header.refs
        finally:
            if indexing is not None:
                await indexing.close()

    @contextlib.asynccontextmanager
    async def _bundle(self, manifest: Manifest) -> AsyncIterator[tuple[ObjectInfo, AsyncIterator[bytes]]]:
        try:
            async with self._store.stream(manifest.object_key, manifest.size) as found:
                yield found
        except ObjectMissing:  # the bucket answers, but the manifest points at nothing
            raise SnapshotRefused("the bundle its manifest names is not there") from None

    async def _install_refs(
        self, key: str, manifest: Manifest, incoming: Path, refs: list[tuple[str, str]]
    ) -> RestoredSnapshot:
        # update-ref checks each name (check-ref-format) and that each object is there.
        commands = "".join(f"create {name} {oid}\n" for oid, name in refs).encode()
        done = await self._git.run(incoming, "update-ref", "--stdin", input=commands)
        if done.returncode != 0:
            raise self._refuse(key, manifest.sha256, f"git update-ref refused its refs ({describe_failure(done)})")
        # The walk also fails on any object the refs reach but the pack lacks. Counting what the refs reach against
        # what the pack holds tells whether it holds anything more (which a hand-made bundle could).
        walked = await self._git.run(incoming, "rev-list", "--objects", "--all", "--count")
        counted = await self._git.run(incoming, "count-objects", "-v")
        if walked.returncode != 0 or counted.returncode != 0:
            raise self._refuse(key, manifest.sha256, f"its refs reach a missing object ({describe_failure(walked)})")
        stats = dict(line.split(": ", 1) for line in counted.stdout.decode().splitlines() if ": " in line)
        clean = stats.get("count") == "0" and stats.get("in-pack") == walked.stdout.decode().strip()
        return RestoredSnapshot(sorted({oid for oid, _ in refs}), clean, manifest.size)

    def _refuse(self, key: str, snapshot: str, why: str) -> SnapshotRefused:
        """Logged once per snapshot (not per request), and that snapshot is not downloaded again."""
        if (key, snapshot) not in self._refused:
            log.warning("snapshot of %s in %s refused: %s; the mirror fills from upstream (logged once per snapshot)",
                        key, self.where, why)  # fmt: skip
            self._refused[(key, snapshot)] = why
        return SnapshotRefused(why)

    # ------------------------------------------------------------ publish

    def note_filled(self, slot: MirrorSlot) -> None:
        """After a fill or refresh: publish in the background if this replica has not tried lately."""
        if not self.settings.publish or slot.key in self._publishing:
            return
        if time.monotonic() < self._next_publish_at.get(slot.key, 0.0):
            return
        task = asyncio.create_task(self.publish(slot), name=f"snapshot publish {slot.key}")
        self._publishing[slot.key] = task
        task.add_done_callback(functools.partial(_forget, self._publishing, slot.key))

    async def publish(self, slot: MirrorSlot) -> PublishResult:
        """Publish a snapshot of the mirror now, unless one of these refs, or a recent one, is there already, or
        another replica is publishing. One at a time per process. Never raises (but for cancellation)."""
        result: PublishResult = "failed"
        try:
            async with self._one_publish_at_a_time, asyncio.timeout(PUBLISH_TIMEOUT):
                result = await self._publish(slot, self.namespace(slot.key))
            self._publishes.succeeded(self.where)
        except (ObjectStoreError, TimeoutError, OSError) as error:
            self._publishes.failed(_describe(error), breaks=False)
        except Exception:
            log.exception("snapshot of %s: publish failed unexpectedly", slot.key)
        pause = self.settings.publish_every
        self._next_publish_at[slot.key] = time.monotonic() + (pause if result != "failed" else
                                                              min(pause, RETRY_FAILED_PUBLISH))  # fmt: skip
        self._metrics.snapshot_publishes.labels(result).inc()
        return result

    async def _publish(self, slot: MirrorSlot, namespace: Namespace) -> PublishResult:
        await _quiet(slot)
        refs = await self._mirror_refs(slot)
        if not refs:
            return "empty"
        skip, _ = await self._current(namespace, refs_digest(refs))
        if skip is not None:
            return skip
        async with self._lease(namespace) as held:
            if not held:
                return "busy"
            skip, etag = await self._current(namespace, refs_digest(refs))  # another may have just finished
            return skip if skip is not None else await self._bundle_and_upload(slot, namespace, etag)

    async def _mirror_refs(self, slot: MirrorSlot) -> list[tuple[str, str]]:
        done = await self._git.run(slot.path, "for-each-ref", "--format=%(objectname) %(refname)", "refs/")
        if done.returncode != 0:
            raise OSError(f"git for-each-ref failed ({describe_failure(done)})")
        return [(oid, name) for oid, _, name in (line.partition(" ") for line in done.stdout.decode().splitlines())]

    async def _current(self, namespace: Namespace, digest: str) -> tuple[PublishResult | None, str | None]:
        """Whether the snapshot there makes a publish needless ("unchanged": these refs; "recent": younger than
        publishEvery), and the ETag a new manifest must replace (If-Match; None: there is none, If-None-Match)."""
        try:
            data, info = await self._store.read_small(namespace.manifest_key, MAX_MANIFEST)
        except ObjectMissing:
            return None, None
        except ObjectStoreError as error:
            if error.kind != "too_large":
                raise
            return None, (await self._store.head(namespace.manifest_key)).etag  # an oversized one is replaced
        manifest = _parse_manifest(data, namespace)  # a malformed or foreign one is replaced too
        if manifest is not None and manifest.refs_digest == digest:
            return "unchanged", info.etag
        if manifest is not None and manifest.age() < self.settings.publish_every:
            return "recent", info.etag
        return None, info.etag

    async def _bundle_and_upload(self, slot: MirrorSlot, namespace: Namespace, etag: str | None) -> PublishResult:
        bundle = await self._create_bundle(slot)
        if bundle is None:
            return "too_large"
        try:
            try:
                size, sha256, refs = await asyncio.to_thread(_describe_bundle, bundle)
            except SnapshotRefused:  # a header over MAX_BUNDLE_HEADER: more refs than a restore would read
                return "too_large"
            if size > self._max_size:
                return "too_large"
            object_key = namespace.new_bundle_key()
            await self._store.upload(object_key, bundle, if_none_match=True)
        finally:
            await asyncio.to_thread(bundle.unlink, True)
        manifest = Manifest(version=1, format="git-bundle-v2", repo_key=namespace.key, namespace=namespace.id,
                            object_key=object_key, size=size, sha256=sha256, refs_digest=refs_digest(refs),
                            created=time.time())  # fmt: skip
        try:
            await self._store.put_bytes(namespace.manifest_key, manifest.model_dump_json().encode(),
                                        if_none_match=etag is None, if_match=etag)  # fmt: skip
        except PreconditionFailed:  # another publisher's manifest went in first: ours is never referenced
            await self._store.delete(object_key)
            return "lost_race"
        self._metrics.snapshot_published_bytes.inc(size)
        log.info("snapshot of %s published to %s (%d bytes)", namespace.key, self.where, size)
        await self._collect_garbage(namespace, object_key)
        return "published"

    async def _create_bundle(self, slot: MirrorSlot) -> Path | None:
        """A full bundle of the mirror's refs (what they reach, nothing else), in the mirror's directory. None when
        the mirror's packs already exceed the bound. The mirror counts as read meanwhile: never evicted under it."""
        await self._prepare_outgoing()
        if not self._mirrors.start_reading(slot):
            raise OSError("the mirror is being evicted")
        try:
            counted = await self._git.run(slot.path, "count-objects", "-v")
            stats = dict(line.split(": ", 1) for line in counted.stdout.decode().splitlines() if ": " in line)
            estimate = (int(stats.get("size-pack", "0")) + int(stats.get("size", "0"))) * 1024
            if estimate > self._max_size:
                return None
            free = (await asyncio.to_thread(shutil.disk_usage, self._outgoing)).free
            if free < estimate + DISK_MARGIN:
                raise OSError(f"{free} bytes free on the mirror's disk, too few for a {estimate}-byte bundle")
            path = self._outgoing / f"{secrets.token_hex(8)}.bundle"
            done = await self._git.run(slot.path, "bundle", "create", "--quiet", "--version=2", str(path), "--all")
        finally:
            self._mirrors.stop_reading(slot)
        if done.returncode != 0:
            await asyncio.to_thread(path.unlink, True)
            raise OSError(f"git bundle create failed ({describe_failure(done)})")
        return path

    async def _prepare_outgoing(self) -> None:
        if not self._outgoing_ready:  # what a process that died mid-publish left behind goes first
            await asyncio.to_thread(shutil.rmtree, self._outgoing, True)
            await asyncio.to_thread(self._outgoing.mkdir, parents=True, exist_ok=True)
            self._outgoing_ready = True

    async def _collect_garbage(self, namespace: Namespace, keep: str) -> None:
        """Bundles no manifest points at, once old enough that no restore still reads them."""
        try:
            for item in await self._store.list(namespace.bundles):
                if item.key != keep and time.time() - item.last_modified > GARBAGE_AFTER:
                    await self._store.delete(item.key)
        except ObjectStoreError as error:  # the next publish tries again
            log.info("snapshot of %s: old bundles not removed yet (%s)", namespace.key, _describe(error))

    # ------------------------------------------------------------ one publisher per repo

    @contextlib.asynccontextmanager
    async def _lease(self, namespace: Namespace) -> AsyncIterator[bool]:
        """The fleet's Redis lease when there is one; otherwise (or while Redis is away) a lock object in the
        bucket, taken with a conditional write. Either way the manifest itself is only ever replaced with If-Match:
        two publishers that both got through still leave one good snapshot."""
        if self._leases is not None and self._leases.available:
            name = f"snapshot-publish:{namespace.id}"
            lease = await self._leases.lease(name, LEASE_SECONDS)
            if lease.owner is not None:
                try:
                    yield True
                finally:
                    await self._leases.release(name, lease.owner)
                return
            if lease.holder is not None:
                yield False
                return
        async with self._store.lock(namespace.lock_key, LEASE_SECONDS) as held:
            yield held

    async def publishes_done(self) -> None:
        """Wait until the publishes under way have ended (tests and benches)."""
        await asyncio.gather(*self._publishing.values(), return_exceptions=True)

    @property
    def publishing(self) -> bool:
        return bool(self._publishing)

    async def close(self) -> None:
        tasks = list(self._publishing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._store.close()


# ---------------------------------------------------------------- helpers


class _Health:
    """The bucket's state as restores or publishes see it: logged once per change, and (for restores) a breaker
    that sends fills straight upstream for BREAK_FOR after a failure."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._failing: str | None = None
        self._broken_until = 0.0

    @property
    def usable(self) -> bool:
        return time.monotonic() >= self._broken_until

    def failed(self, why: str, breaks: bool) -> None:
        if breaks:
            self._broken_until = time.monotonic() + BREAK_FOR
        if self._failing != why:
            self._failing = why
            log.warning("snapshot %s failing: %s; mirrors fill from upstream meanwhile (logged once per change)",
                        self._what, why)  # fmt: skip

    def succeeded(self, where: str) -> None:
        if self._failing is not None:
            self._failing = None
            log.info("snapshot %s work again (%s)", self._what, where)


async def _quiet(slot: MirrorSlot) -> None:
    """Until no request reads the mirror (within QUIET_WAIT): the clone whose fill asked for this publish is served
    first, instead of sharing the CPU and the disk with the bundle being made."""
    waited = 0.0
    while slot.readers and waited < QUIET_WAIT:
        await asyncio.sleep(1.0)
        waited += 1.0


def _parse_manifest(data: bytes, namespace: Namespace) -> Manifest | None:
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError:
        return None
    return manifest if manifest.binds(namespace) else None


def _describe_bundle(path: Path) -> tuple[int, str, list[tuple[str, str]]]:
    """Size, sha256 and refs of a bundle file (in a thread: it reads the whole file)."""
    digest, header, size = hashlib.sha256(), _HeaderReader(), 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if header.refs is None:
                header.feed(chunk)
    if header.refs is None:
        raise OSError("git bundle create wrote no header")
    return size, digest.hexdigest(), header.refs


async def _tail(stream: asyncio.StreamReader, keep: int = 4096) -> bytes:
    """What a child printed, all read (so that it never blocks on a full pipe), the last `keep` bytes kept."""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-keep:]
    return kept


class _IndexPack:
    """`git index-pack --stdin --strict` into a mirror, fed through a pipe of our own written from a thread: an
    asyncio pipe would be woken each time index-pack takes its next 4 KiB (tens of thousands of loop turns, about
    a second of CPU per 200 MiB); a blocking write of a whole chunk costs one thread hop."""

    def __init__(self, process: asyncio.subprocess.Process, pipe: int) -> None:
        assert process.stderr is not None
        self._process = process
        self._pipe: int | None = pipe
        self._errors = asyncio.ensure_future(_tail(process.stderr))

    @classmethod
    async def start(cls, mirror: Path, size: int, env: dict[str, str]) -> _IndexPack:
        # --strict: every object is checked (fsck) and so is every link: a pack missing an object is refused.
        argv = ["git", f"--git-dir={mirror}", "index-pack", "--stdin", "--strict", f"--max-input-size={size}"]
        reading, writing = os.pipe()
        with contextlib.suppress(OSError, AttributeError):  # a larger pipe: fewer switches; not everywhere
            fcntl.fcntl(writing, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=reading, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own group, killed as one by `reap` (as proxy.subprocesses does)
            )  # fmt: skip
        except BaseException:
            os.close(writing)
            raise
        finally:
            os.close(reading)
        return cls(process, writing)

    async def feed(self, data: bytes, digest: Hash | None = None) -> bool:
        """Hashed into `digest` and written, in a thread; False once index-pack no longer reads (it exited)."""
        assert self._pipe is not None
        try:
            await asyncio.to_thread(_hash_and_write, digest, self._pipe, data)
        except BrokenPipeError:
            return False
        return True

    async def finish(self) -> str | None:
        """End of input; None if index-pack accepted the pack, else its last words."""
        self._close_pipe()
        if await self._process.wait() == 0:
            return None
        said = (await self._errors).decode(errors="replace").strip().splitlines()
        return said[-1][:200] if said else "no message"

    async def close(self) -> None:
        self._close_pipe()
        await reap(self._process)
        self._errors.cancel()

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


def _hash_and_write(digest: Hash | None, pipe: int, data: bytes) -> None:
    if digest is not None:
        digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(pipe, view) :]


def _describe(error: BaseException) -> str:
    if isinstance(error, ObjectStoreError):
        return f"{error.kind}: {error}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {str(error)[:200]}"


def _forget(tasks: dict[str, asyncio.Task[PublishResult]], key: str, task: asyncio.Task[PublishResult]) -> None:
    if tasks.get(key) is task:
        del tasks[key]
