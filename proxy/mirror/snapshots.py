"""Mirror snapshots in S3-compatible object storage, as the mirror sees them: a replica with an empty mirror starts a
repo from the newest snapshot (a git bundle, checked by its manifest's sha256 and by git) and fetches the rest from
upstream; after a fill, `snapshot_publish` publishes one in the background.

A snapshot never widens what a client can read: it only saves the bytes of the first fetch. The fill that restores
one still fetches from upstream with the request's credential (no mirror is installed if that fetch fails), refs
come from upstream, and a pack leaves the mirror only under `proof`, exactly as without snapshots. The layout in the
bucket, and what binds a manifest to its repo, are in `snapshot_format`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..bounded import BoundedDict
from ..config.mirror import SnapshotsConfig
from .gitrun import MirrorGit, describe_failure
from .objectstore import ObjectInfo, ObjectMissing, ObjectStore, ObjectStoreError, ObjectTooLarge
from .snapshot_disk import ensure_room, object_counts, restored_size
from .snapshot_format import (
    MAX_MANIFEST,
    BundleHeaderReader,
    Manifest,
    Namespace,
    SnapshotRefused,
    parse_manifest,
    refs_digest,
)
from .snapshot_health import BucketHealth, SnapshotMetrics
from .snapshot_publish import FleetLeases, SnapshotPublisher
from .snapshot_unpack import IndexPack, Progress
from .store import MirrorSlot, MirrorStore

# What the mirror imports from here; FleetLeases, which a Mirror hands in, is the publisher's.
__all__ = ["FleetLeases", "RestoredSnapshot", "Snapshots"]

log = logging.getLogger("git_token_proxy.snapshots")

RestoreResult = Literal["restored", "missing", "refused", "failed", "skipped"]
# A manifest is at most 64 KiB: a store that takes longer than this to send one is failing, whatever restoreTimeout
# allows the bundle.
MANIFEST_TIMEOUT = 10.0
# A snapshot git took too long to check is tried again after this: the replica may only have been busy then.
SLOW_REFUSAL = 3600.0


@dataclass(frozen=True)
class RestoredSnapshot:
    """A mirror built from a snapshot, still in its incoming directory, with the snapshot's refs. The caller fetches
    from upstream into it; the mirror is clean (CLEAN_MARK) only if `clean` and every tip is still reachable from
    the refs upstream gave."""

    tips: list[str]
    clean: bool  # its pack holds exactly what its refs reach
    size: int


class Snapshots:
    """One per process with mirror.snapshots. `restore` is what a fill calls instead of starting from nothing;
    `note_filled` is told after every fill and refresh and publishes in the background (`publisher`). Neither ever
    raises."""

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
        self._health = BucketHealth("restores")
        # (key, sha256) -> why, and until when (time.monotonic(); inf: for as long as the process lives)
        self._refused: BoundedDict[tuple[str, str], tuple[str, float]] = BoundedDict(10_000)
        self.where = f"s3://{settings.bucket}/{settings.prefix}"
        self.publisher = SnapshotPublisher(settings, store, git, mirrors, metrics, self._max_size, leases, self.where)

    async def prepare(self) -> None:
        """At start-up, in the background: the S3 client is built (about half a second) before the first restore
        needs it. Never raises: a bucket that is away shows on the first restore."""
        with contextlib.suppress(ObjectStoreError):
            await self._store.open()

    def namespace(self, key: str) -> Namespace:
        return Namespace.of(self.settings.prefix, key)

    def note_filled(self, slot: MirrorSlot) -> None:
        """After a fill or refresh: publish in the background if this replica has not tried lately."""
        self.publisher.note_filled(slot)

    async def close(self) -> None:
        await self.publisher.close()
        await self._store.close()

    # ------------------------------------------------------------ restore

    async def restore(self, key: str, incoming: Path) -> RestoredSnapshot | None:
        """Build the mirror of `key` at `incoming` (which must not exist) from its newest snapshot. None when there
        is none or anything is wrong with it or the bucket: `incoming` is then left absent, for a fill from
        nothing. Bounded by restoreTimeout, maxSnapshotSize, the mirror's maxSize and the free disk."""
        restored: RestoredSnapshot | None = None
        result: RestoreResult = "failed"
        progress = Progress()
        try:
            if not self._health.usable:
                result = "skipped"
            else:
                async with asyncio.timeout(self.settings.restore_timeout):
                    restored = await self._restore(self.namespace(key), incoming, progress)
                result = "restored"
                self._health.succeeded(self.where)
                self._metrics.snapshot_restored_bytes.inc(restored.size)
                log.info("mirror of %s restored from a snapshot (%d bytes)", key, restored.size)
        except ObjectMissing:
            log.debug("no snapshot of %s in %s", key, self.where)
            result = "missing"
        except SnapshotRefused:
            result = "refused"
        except TimeoutError as error:
            if progress.git_was_the_cost(self.settings.restore_timeout) and progress.snapshot is not None:
                # The snapshot's cost, not the bucket's pace (a pack that inflates a thousandfold): that snapshot
                # is not tried again, and the bucket stays in use for every other repo.
                slow = f"git took longer than restoreTimeout ({self.settings.restore_timeout:g} s) to check it"
                self._refuse(key, progress.snapshot, slow, for_seconds=SLOW_REFUSAL)
                result = "refused"
            else:
                self._health.failed(error, breaks=True)  # a slow bucket: the next restores skip it for a while
        except ObjectStoreError as error:
            self._health.failed(error, breaks=True)
        except OSError as error:  # the local disk or git's start: not the bucket's fault
            self._health.failed(error, breaks=False)
        except Exception:  # a bug: the clone still goes on, from upstream
            log.exception("snapshot of %s: restore failed unexpectedly", key)
        finally:
            if restored is None:
                await asyncio.to_thread(shutil.rmtree, incoming, True)
        self._metrics.snapshot_restores.labels(result).inc()
        return restored

    async def _restore(self, namespace: Namespace, incoming: Path, progress: Progress) -> RestoredSnapshot:
        try:
            async with asyncio.timeout(MANIFEST_TIMEOUT):
                data, _ = await self._store.read_small(namespace.manifest_key, MAX_MANIFEST)
        except ObjectTooLarge:  # a snapshot's fault, not the bucket's: refused, and the breaker stays closed
            oversized = f"its manifest is over {MAX_MANIFEST} bytes"
            raise self._refuse(namespace.key, "an oversized manifest", oversized) from None
        manifest = parse_manifest(data, namespace)
        if manifest is None:
            raise self._refuse(namespace.key, f"manifest {hashlib.sha256(data).hexdigest()}",
                               "its manifest is malformed, or names another repo or bundle")  # fmt: skip
        progress.snapshot = manifest.sha256
        why = self._still_refused(namespace.key, manifest.sha256)
        if why is not None:
            raise SnapshotRefused(why)  # logged when it was first refused; not downloaded again
        if manifest.size > self._max_size:
            raise self._refuse(namespace.key, manifest.sha256, f"{manifest.size} bytes, over the {self._max_size}"
                               " allowed (maxSnapshotSize, mirror.maxSize)")  # fmt: skip
        await self._mirrors.prepare()
        await ensure_room(incoming.parent, manifest.size + manifest.size // 8, f"a {manifest.size}-byte snapshot")
        done = await self._git.init_bare(incoming)
        if done.returncode != 0:
            raise OSError(f"git init failed ({describe_failure(done)})")
        try:
            refs = await self._unpack(manifest, incoming, progress)
        except SnapshotRefused as refused:
            raise self._refuse(namespace.key, manifest.sha256, str(refused)) from None
        if refs_digest(refs) != manifest.refs_digest:
            raise self._refuse(namespace.key, manifest.sha256, "its refs are not the ones its manifest names")
        progress.on_git()
        return await self._install_refs(namespace.key, manifest, incoming, refs)

    async def _unpack(self, manifest: Manifest, incoming: Path, progress: Progress) -> list[tuple[str, str]]:
        """Streams the bundle into `git index-pack --strict` as it arrives (no copy on disk, and the download and
        the indexing overlap), hashing it on the way. git checks every object (its id is the hash of what it
        holds) and that the pack is complete; the sha256 and size are then compared with the manifest's."""
        digest, header = hashlib.sha256(), BundleHeaderReader()
        indexing: IndexPack | None = None
        try:
            async with self._bundle(manifest) as (info, chunks):
                if info.size != manifest.size:
                    raise SnapshotRefused(f"the bundle holds {info.size} bytes, its manifest says {manifest.size}")
                async for chunk in chunks:
                    progress.on_bucket(len(chunk))
                    if indexing is not None:
                        progress.on_git()
                        fed = await indexing.feed(chunk, digest)
                    else:
                        digest.update(chunk)  # the header's chunks: one or a few
                        data = header.feed(chunk)
                        if data is None:
                            continue
                        await self._ensure_room_for_index(incoming, manifest, data)
                        progress.on_git()
                        indexing = await IndexPack.start(incoming, manifest.size, self._git.env())
                        fed = await indexing.feed(data)
                    progress.back_to_bucket()
                    if not fed:
                        break  # index-pack gave up: its exit status says why
            if indexing is None or header.refs is None:
                raise SnapshotRefused("the bundle ends inside its header")
            progress.on_git()
            said = await indexing.finish()
            if said is not None:
                raise SnapshotRefused(f"git index-pack refused it ({said})")
            if digest.hexdigest() != manifest.sha256:
                raise SnapshotRefused("its sha256 is not the one its manifest names (corrupt or replaced)")
            return header.refs
        finally:
            if indexing is not None:
                await indexing.close()

    async def _ensure_room_for_index(self, incoming: Path, manifest: Manifest, pack_start: bytes) -> None:
        """Once the pack's object count is known: its index counts against maxSize and the free disk too."""
        needed = restored_size(manifest.size, pack_start)
        if needed is None:
            return
        if needed > self._max_size:
            raise SnapshotRefused(f"its pack and index would take {needed} bytes, over the {self._max_size} allowed")
        await ensure_room(incoming.parent, needed, f"a snapshot that takes {needed} bytes with its index")

    @contextlib.asynccontextmanager
    async def _bundle(self, manifest: Manifest) -> AsyncIterator[tuple[ObjectInfo, AsyncIterator[bytes]]]:
        try:
            async with self._store.stream(manifest.object_key, manifest.size) as found:
                yield found
        except ObjectMissing:  # the bucket answers, but the manifest points at nothing
            raise SnapshotRefused("the bundle its manifest names is not there") from None
        except ObjectTooLarge:  # larger than its manifest says: the snapshot's fault, not the bucket's
            raise SnapshotRefused(f"the bundle holds more than the {manifest.size} bytes its manifest says") from None

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
        stats = await object_counts(self._git, incoming)
        if walked.returncode != 0 or stats is None:
            raise self._refuse(key, manifest.sha256, f"its refs reach a missing object ({describe_failure(walked)})")
        clean = stats.get("count") == "0" and stats.get("in-pack") == walked.stdout.decode().strip()
        return RestoredSnapshot(sorted({oid for oid, _ in refs}), clean, manifest.size)

    def _refuse(self, key: str, snapshot: str, why: str, for_seconds: float = math.inf) -> SnapshotRefused:
        """Logged once per snapshot (not per request), and that snapshot is not downloaded again (for `for_seconds`
        when the refusal may be this replica's moment rather than the snapshot's fault)."""
        if self._still_refused(key, snapshot) is None:
            log.warning("snapshot of %s in %s refused: %s; the mirror fills from upstream (logged once per snapshot)",
                        key, self.where, why)  # fmt: skip
            self._refused[(key, snapshot)] = (why, time.monotonic() + for_seconds)
        return SnapshotRefused(why)

    def _still_refused(self, key: str, snapshot: str) -> str | None:
        refused = self._refused.get((key, snapshot))
        if refused is None:
            return None
        why, until = refused
        if time.monotonic() < until:
            return why
        del self._refused[(key, snapshot)]
        return None
