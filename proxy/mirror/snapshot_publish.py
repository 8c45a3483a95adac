"""Publishing mirror snapshots: after a fill, in the background, at most every `publishEvery` per repo and one
publisher at a time across the fleet, a bundle of the mirror goes under a new key and the manifest that makes it
visible is switched to it last, with a conditional write; bundles no manifest points at any more are deleted."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ..bounded import BoundedDict
from ..config.mirror import MAX_RESTORE_TIMEOUT, SnapshotsConfig
from .gitrun import MirrorGit, describe_failure
from .objectstore import ObjectMissing, ObjectStore, ObjectStoreError, PreconditionFailed
from .snapshot_disk import ensure_room, object_counts
from .snapshot_format import (
    MAX_MANIFEST,
    BundleHeaderReader,
    Manifest,
    Namespace,
    SnapshotRefused,
    parse_manifest,
    refs_digest,
)
from .snapshot_health import BucketHealth, SnapshotMetrics, describe_error
from .store import MirrorSlot, MirrorStore

log = logging.getLogger("git_token_proxy.snapshots")

PUBLISH_TIMEOUT = 1800.0  # a publish of up to 5 GiB (bundle, hash, upload) never takes longer than this
LEASE_SECONDS = PUBLISH_TIMEOUT + 60.0  # so a lease always outlives the publish that holds it
RETRY_FAILED_PUBLISH = 300.0  # a publish that failed is tried again after the next fill this much later at the earliest
# An unreferenced bundle is deleted once this old: longer than any restore that may still be reading it (it read the
# previous manifest) and any publisher that uploaded it but has not yet written its manifest. The bundle the replaced
# manifest named is kept whatever its age, until the next publish (see `_collect_garbage`).
GARBAGE_AFTER = 2 * max(MAX_RESTORE_TIMEOUT, LEASE_SECONDS)
QUIET_WAIT = 60.0  # a publish waits at most this long for the requests reading its mirror to end

PublishResult = Literal["published", "unchanged", "recent", "busy", "lost_race", "too_large", "empty", "failed"]


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
class _Current:
    """What the manifest in the bucket means for a publish: whether one is needless ("unchanged": these refs;
    "recent": younger than publishEvery), the ETag a new manifest must replace (If-Match; None: there is none, so
    If-None-Match), and the bundle it names, which a restore may still be reading."""

    skip: PublishResult | None
    etag: str | None
    bundle: str | None = None


class SnapshotPublisher:
    """One per process with mirror.snapshots. `note_filled` is told after every fill and refresh and publishes in
    the background; `publish` publishes now. Neither ever raises (but for cancellation)."""

    def __init__(
        self, settings: SnapshotsConfig, store: ObjectStore, git: MirrorGit, mirrors: MirrorStore,
        metrics: SnapshotMetrics, max_size: int, leases: FleetLeases | None, where: str,
    ) -> None:  # fmt: skip
        self.settings = settings
        self._store = store
        self._git = git
        self._mirrors = mirrors
        self._metrics = metrics
        self._max_size = max_size
        self._leases = leases
        self._where = where
        self._outgoing = mirrors.root / "snapshots"  # bundles being published; emptied when the first one starts
        self._outgoing_ready = False
        self._health = BucketHealth("publishes")
        self._publishing: dict[str, asyncio.Task[PublishResult]] = {}
        # A publish reads the whole mirror and uploads it: one at a time, whatever the number of repos filled.
        self._one_publish_at_a_time = asyncio.Semaphore(1)
        self._next_publish_at: BoundedDict[str, float] = BoundedDict(100_000)

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
                result = await self._publish(slot, Namespace.of(self.settings.prefix, slot.key))
            self._health.succeeded(self._where)
        except (ObjectStoreError, TimeoutError, OSError) as error:
            self._health.failed(error, breaks=False)
        except Exception:
            log.exception("snapshot of %s: publish failed unexpectedly", slot.key)
        pause = self.settings.publish_every
        self._next_publish_at[slot.key] = time.monotonic() + (pause if result != "failed" else
                                                              min(pause, RETRY_FAILED_PUBLISH))  # fmt: skip
        self._metrics.snapshot_publishes.labels(result).inc()
        return result

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

    # ------------------------------------------------------------ one publish

    async def _publish(self, slot: MirrorSlot, namespace: Namespace) -> PublishResult:
        await _quiet(slot)
        refs = await self._mirror_refs(slot)
        if not refs:
            return "empty"
        current = await self._current(namespace, refs_digest(refs))
        if current.skip is not None:
            return current.skip
        async with self._lease(namespace) as held:
            if not held:
                return "busy"
            current = await self._current(namespace, refs_digest(refs))  # another may have just finished
            if current.skip is not None:
                return current.skip
            return await self._bundle_and_upload(slot, namespace, current.etag, current.bundle)

    async def _mirror_refs(self, slot: MirrorSlot) -> list[tuple[str, str]]:
        done = await self._git.run(slot.path, "for-each-ref", "--format=%(objectname) %(refname)", "refs/")
        if done.returncode != 0:
            raise OSError(f"git for-each-ref failed ({describe_failure(done)})")
        return [(oid, name) for oid, _, name in (line.partition(" ") for line in done.stdout.decode().splitlines())]

    async def _current(self, namespace: Namespace, digest: str) -> _Current:
        try:
            data, info = await self._store.read_small(namespace.manifest_key, MAX_MANIFEST)
        except ObjectMissing:
            return _Current(None, None)
        except ObjectStoreError as error:
            if error.kind != "too_large":
                raise
            return _Current(None, (await self._store.head(namespace.manifest_key)).etag)  # an oversized one is replaced
        manifest = parse_manifest(data, namespace)  # a malformed or foreign one is replaced too
        if manifest is None:
            return _Current(None, info.etag)
        if manifest.refs_digest == digest:
            return _Current("unchanged", info.etag)
        if manifest.age() < self.settings.publish_every:
            return _Current("recent", info.etag)
        return _Current(None, info.etag, manifest.object_key)

    async def _bundle_and_upload(
        self, slot: MirrorSlot, namespace: Namespace, etag: str | None, replaced: str | None = None
    ) -> PublishResult:
        """Bundle, upload, then the manifest, written only if it is still the one read (`etag`). `replaced`: the
        bundle that manifest names."""
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
        log.info("snapshot of %s published to %s (%d bytes)", namespace.key, self._where, size)
        await self._collect_garbage(namespace, {object_key, replaced})
        return "published"

    async def _create_bundle(self, slot: MirrorSlot) -> Path | None:
        """A full bundle of the mirror's refs (what they reach, nothing else), in the mirror's directory. None when
        the mirror's packs already exceed the bound. The mirror counts as read meanwhile: never evicted under it."""
        await self._prepare_outgoing()
        if not self._mirrors.start_reading(slot):
            raise OSError("the mirror is being evicted")
        try:
            stats = await object_counts(self._git, slot.path) or {}
            estimate = (int(stats.get("size-pack", "0")) + int(stats.get("size", "0"))) * 1024
            if estimate > self._max_size:
                return None
            await ensure_room(self._outgoing, estimate, f"a {estimate}-byte bundle")
            path = self._outgoing / f"{secrets.token_hex(8)}.bundle"
            try:
                done = await self._git.run(slot.path, "bundle", "create", "--quiet", "--version=2", str(path), "--all")
            except BaseException:  # cancelled (the publish timed out, the proxy stops): no partial bundle stays
                path.unlink(missing_ok=True)
                raise
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

    async def _collect_garbage(self, namespace: Namespace, keep: set[str | None]) -> None:
        """Bundles no manifest points at, once old enough that no restore still reads them. `keep`: the bundle just
        published, and the one the manifest it replaced named: a restore that read that manifest a moment ago may be
        reading it, whatever its age; it goes with the next publish, at least publishEvery later."""
        try:
            for item in await self._store.list(namespace.bundles):
                if item.key not in keep and time.time() - item.last_modified > GARBAGE_AFTER:
                    await self._store.delete(item.key)
        except ObjectStoreError as error:  # the next publish tries again
            log.info("snapshot of %s: old bundles not removed yet (%s)", namespace.key, describe_error(error))

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


async def _quiet(slot: MirrorSlot) -> None:
    """Until no request reads the mirror (within QUIET_WAIT): the clone whose fill asked for this publish is served
    first, instead of sharing the CPU and the disk with the bundle being made."""
    waited = 0.0
    while slot.readers and waited < QUIET_WAIT:
        await asyncio.sleep(1.0)
        waited += 1.0


def _describe_bundle(path: Path) -> tuple[int, str, list[tuple[str, str]]]:
    """Size, sha256 and refs of a bundle file (in a thread: it reads the whole file)."""
    digest, header, size = hashlib.sha256(), BundleHeaderReader(), 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if header.refs is None:
                header.feed(chunk)
    if header.refs is None:
        raise OSError("git bundle create wrote no header")
    return size, digest.hexdigest(), header.refs


def _forget(tasks: dict[str, asyncio.Task[PublishResult]], key: str, task: asyncio.Task[PublishResult]) -> None:
    if tasks.get(key) is task:
        del tasks[key]
