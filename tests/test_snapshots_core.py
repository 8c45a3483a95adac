"""Publishing and restoring mirror snapshots with real git, the fake GitHub and a real S3 server (SeaweedFS): what a
restore builds, every way a snapshot or a bucket can be wrong (each a miss, logged once, never a failure), one
publisher at a time, isolation between upstream paths, and old bundles going away."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from proxy.config.mirror import SnapshotsConfig
from proxy.credentials.redis_store import RedisStore
from proxy.metrics import Metrics
from proxy.mirror import snapshot_health, snapshot_publish
from proxy.mirror.fill import MIRROR_REFSPEC
from proxy.mirror.gitrun import MirrorGit
from proxy.mirror.objectstore import ObjectStore, StaticCredentials
from proxy.mirror.snapshot_format import MAX_MANIFEST, Namespace
from proxy.mirror.snapshot_publish import PublishResult
from proxy.mirror.snapshots import RestoredSnapshot, Snapshots
from proxy.mirror.store import MirrorSlot, MirrorStore
from proxy.testing import FakeGitHub, git_env
from proxy.testing.redis import RedisServer
from proxy.testing.s3 import ADMIN, NOBODY, S3Identity, SeaweedS3

pytestmark = pytest.mark.timeout(180)

TOKEN = "snapshot-core-token-0123456789abcdef"
KEY = "github.com/acme/app"
PREFIX = "fleet/git-token-proxy"


class SnapshotCounters:
    """The four counters Snapshots records, in a registry of their own (until proxy.metrics.Metrics has them)."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.snapshot_restores = Counter("restores", "", ["result"], registry=registry)
        self.snapshot_publishes = Counter("publishes", "", ["result"], registry=registry)
        self.snapshot_restored_bytes = Counter("restored_bytes", "", registry=registry)
        self.snapshot_published_bytes = Counter("published_bytes", "", registry=registry)

    def restores(self, result: str) -> float:
        return float(self.snapshot_restores.labels(result)._value.get())

    def publishes(self, result: str) -> float:
        return float(self.snapshot_publishes.labels(result)._value.get())


class Replica:
    """What one proxy holds for snapshots: its mirror directory, git, and Snapshots over its own S3 client."""

    def __init__(self, root: Path, settings: SnapshotsConfig, identity: S3Identity, leases: Any = None) -> None:
        self.mirrors = MirrorStore(root)
        self.git = MirrorGit(self.mirrors.home, None)
        self.metrics = SnapshotCounters()
        store = ObjectStore(settings.bucket, endpoint=settings.endpoint,
                            credentials=StaticCredentials(identity.access_key, identity.secret_key))  # fmt: skip
        self.snapshots = Snapshots(settings, store, self.git, self.mirrors, self.metrics, 10 << 30, leases)

    async def fill(self, url: str, key: str = KEY) -> MirrorSlot:
        """The mirror as a first fill makes it today: init, fetch everything from upstream, install."""
        await self.mirrors.prepare()
        slot = self.mirrors.slot(key)
        incoming = await self.mirrors.incoming_path(slot)
        assert (await self.git.init_bare(incoming)).returncode == 0
        authorization = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
        done = await self.git.fetch(incoming, url, [MIRROR_REFSPEC], authorization, prune=True)
        assert done.returncode == 0, done.stderr
        await self.mirrors.install(incoming, slot)
        return slot

    async def publish(self, slot: MirrorSlot) -> PublishResult:
        return await self.snapshots.publisher.publish(slot)

    async def restore(self, key: str = KEY) -> tuple[RestoredSnapshot | None, Path]:
        await self.mirrors.prepare()
        incoming = await self.mirrors.incoming_path(self.mirrors.slot(key))
        return await self.snapshots.restore(key, incoming), incoming


@pytest.fixture
def settings(s3: SeaweedS3) -> SnapshotsConfig:
    bucket = s3.make_bucket(f"test-{secrets.token_hex(6)}")
    return SnapshotsConfig(url=f"s3://{bucket}/{PREFIX}", endpoint=s3.endpoint)


@pytest.fixture
async def replicas(tmp_path: Path, settings: SnapshotsConfig) -> AsyncIterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(name: str, identity: S3Identity = ADMIN, leases: Any = None, **changes: Any) -> Replica:
        replica = Replica(tmp_path / name, settings.model_copy(update=changes), identity, leases)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        await replica.snapshots.close()


@pytest.fixture
def upstream(fake_github: FakeGitHub) -> str:
    fake_github.add_token(TOKEN)
    fake_github.create_repo("acme/app", {"README.md": b"# app\n", "blob.bin": os.urandom(512 * 1024)})
    fake_github.commit("acme/app", "second.txt", b"a second commit\n")
    return f"{fake_github.url}/acme/app.git"


def git(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    """The real git CLI in `cwd`, isolated (no user config), with `input` on stdin."""
    done = subprocess.run(["git", *args], cwd=cwd, env=git_env(cwd.parent / "git-home"), input=input,
                          capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def refs_of(repo: Path) -> bytes:
    return git("for-each-ref", "--format=%(objectname) %(refname)", "refs/", cwd=repo)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "git_token_proxy.snapshots" and r.levelno >= 30]


# ---------------------------------------------------------------- publish, then restore


async def test_a_restored_mirror_is_upstreams_and_needs_only_the_delta(
    replicas: Callable[..., Replica], upstream: str, fake_github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = replicas("a"), replicas("b")
    slot = await a.fill(upstream)
    assert await a.publish(slot) == "published"
    assert a.metrics.snapshot_published_bytes._value.get() > 512 * 1024

    newer = fake_github.commit("acme/app", "third.txt", b"pushed after the snapshot\n")
    restored, incoming = await b.restore()
    assert restored is not None and restored.clean
    assert restored.tips == [git("rev-parse", "HEAD~1", cwd=fake_github.repo_path("acme/app")).decode().strip()]
    git("fsck", "--strict", "--no-dangling", cwd=incoming)
    assert b.metrics.restores("restored") == 1 and b.metrics.snapshot_restored_bytes._value.get() > 512 * 1024

    before = fake_github.upload_pack_bytes
    done = await b.git.fetch(incoming, upstream, [MIRROR_REFSPEC], "Basic " + base64.b64encode(
        f"x-access-token:{TOKEN}".encode()).decode(), prune=True)  # fmt: skip
    assert done.returncode == 0
    assert fake_github.upload_pack_bytes - before < 16 * 1024  # the new commit, not the 512 KiB blob again
    assert refs_of(incoming) == refs_of(fake_github.repo_path("acme/app"))
    assert newer.encode() in refs_of(incoming)
    assert not warnings(caplog)


async def test_no_snapshot_is_a_miss_and_leaves_nothing(replicas: Callable[..., Replica]) -> None:
    b = replicas("b")
    restored, incoming = await b.restore("github.com/acme/never-published")
    assert restored is None and not incoming.exists()
    assert b.metrics.restores("missing") == 1


async def test_publish_skips_what_is_there_and_old_bundles_go(
    replicas: Callable[..., Replica], upstream: str, fake_github: FakeGitHub, s3: SeaweedS3,
    settings: SnapshotsConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    a = replicas("a")
    slot = await a.fill(upstream)
    assert await a.publish(slot) == "published"
    assert await a.publish(slot) == "unchanged"  # the same refs
    fake_github.commit("acme/app", "third.txt", b"new\n")
    await refresh(a, slot, upstream)
    assert await a.publish(slot) == "recent"  # another one less than publishEvery ago

    eager = replicas("eager", publish_every=0.001)
    eager_slot = await eager.fill(upstream)
    monkeypatch.setattr(snapshot_publish, "GARBAGE_AFTER", 0.0)  # every unreferenced bundle is old enough
    (first,) = bundles_in(s3, settings)
    assert await eager.publish(eager_slot) == "published"
    # The bundle the replaced manifest named stays: a restore that read that manifest a moment ago may be reading it.
    assert len(bundles_in(s3, settings)) == 2 and first in bundles_in(s3, settings)
    fake_github.commit("acme/app", "fourth.txt", b"newer\n")
    await refresh(eager, eager_slot, upstream)
    assert await eager.publish(eager_slot) == "published"
    bundles = bundles_in(s3, settings)
    assert len(bundles) == 2 and first not in bundles  # gone with the next publish, no longer referenced
    restored, _ = await replicas("b").restore()
    assert restored is not None and restored.tips == [fake_github.head("acme/app")]


def bundles_in(s3: SeaweedS3, settings: SnapshotsConfig) -> list[str]:
    return [key for key in s3.keys(settings.bucket) if "/bundles/" in key]


async def refresh(replica: Replica, slot: MirrorSlot, url: str) -> None:
    authorization = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert (await replica.git.fetch(slot.path, url, [MIRROR_REFSPEC], authorization, prune=True)).returncode == 0


async def test_note_filled_publishes_once_in_the_background(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig
) -> None:
    a = replicas("a")
    slot = await a.fill(upstream)
    a.snapshots.note_filled(slot)
    a.snapshots.note_filled(slot)  # while the first runs
    await a.snapshots.publisher.publishes_done()
    a.snapshots.note_filled(slot)  # within publishEvery of the last attempt: nothing
    assert not a.snapshots.publisher.publishing
    assert a.metrics.publishes("published") == 1 and sum(1 for k in s3.keys(settings.bucket) if "manifest" in k) == 1


async def test_a_replica_that_only_restores_never_publishes(replicas: Callable[..., Replica], upstream: str) -> None:
    reader = replicas("reader", publish=False)
    slot = await reader.fill(upstream)
    reader.snapshots.note_filled(slot)
    assert not reader.snapshots.publisher.publishing


# ---------------------------------------------------------------- one publisher at a time


async def test_two_publishers_at_once_leave_one_good_snapshot(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig
) -> None:
    a, a2 = replicas("a"), replicas("a2")
    slots = [await a.fill(upstream), await a2.fill(upstream)]
    results = await asyncio.gather(a.publish(slots[0]), a2.publish(slots[1]))
    assert sorted(results) in (["busy", "published"], ["published", "unchanged"])
    keys = s3.keys(settings.bucket)
    assert sum(1 for k in keys if k.endswith("manifest.json")) == 1
    assert sum(1 for k in keys if "/bundles/" in k) == 1 and not any(k.endswith(".lock") for k in keys)
    restored, _ = await replicas("b").restore()
    assert restored is not None and restored.clean


async def test_with_redis_one_replica_holds_the_lease(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        stores = [RedisStore(redis.url, "gtp", 2.0, Metrics()) for _ in range(2)]
        try:
            a, a2 = replicas("a", leases=stores[0]), replicas("a2", leases=stores[1])
            slots = [await a.fill(upstream), await a2.fill(upstream)]
            results = await asyncio.gather(a.publish(slots[0]), a2.publish(slots[1]))
            assert sorted(results) in (["busy", "published"], ["published", "unchanged"])
            assert not any(k.endswith(".lock") for k in s3.keys(settings.bucket))  # Redis held it, not the bucket
        finally:
            for store in stores:
                await store.close()


async def test_a_manifest_replaced_meanwhile_is_never_overwritten(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig
) -> None:
    """The publisher that read the manifest before another replaced it loses (If-Match), and its bundle goes."""
    a, a2 = replicas("a"), replicas("a2")
    slot, slot2 = await a.fill(upstream), await a2.fill(upstream)
    namespace = a.snapshots.namespace(KEY)
    assert await a.publish(slot) == "published"
    winner = s3.read(settings.bucket, namespace.manifest_key)
    late = a2.snapshots.publisher
    assert await late._bundle_and_upload(slot2, namespace, etag='"what-it-read-earlier"') == "lost_race"
    assert s3.read(settings.bucket, namespace.manifest_key) == winner
    assert sum(1 for k in s3.keys(settings.bucket) if "/bundles/" in k) == 1


# ---------------------------------------------------------------- isolation


async def test_two_base_url_paths_never_share_a_snapshot(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    team_a, team_b = MirrorStore.key_of("git.corp/team-a/acme/app"), MirrorStore.key_of("git.corp/team-b/acme/app")
    assert team_a is not None and team_b is not None
    a, b = replicas("a"), replicas("b")
    assert await a.publish(await a.fill(upstream, team_a)) == "published"
    restored, _ = await b.restore(team_b)
    assert restored is None and b.metrics.restores("missing") == 1

    # Whoever can write to the bucket copies team A's manifest and bundle under team B's namespace: refused.
    source, target = Namespace.of(PREFIX, team_a), Namespace.of(PREFIX, team_b)
    manifest = s3.read(settings.bucket, source.manifest_key)
    object_key = json.loads(manifest)["object_key"]
    s3.write(settings.bucket, target.manifest_key, manifest)
    s3.write(settings.bucket, target.bundles + object_key.rsplit("/", 1)[1], s3.read(settings.bucket, object_key))
    restored, incoming = await b.restore(team_b)
    assert restored is None and not incoming.exists() and b.metrics.restores("refused") == 1
    assert len(warnings(caplog)) == 1


# ---------------------------------------------------------------- a hostile or broken snapshot


def flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def rewrite_manifest(s3: SeaweedS3, bucket: str, namespace: Namespace, **changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(s3.read(bucket, namespace.manifest_key))
    manifest.update(changes)
    s3.write(bucket, namespace.manifest_key, json.dumps(manifest).encode())
    return manifest


BREAKAGES = ["corrupt", "truncated", "longer", "replaced_and_rehashed", "refs_not_the_manifests", "manifest_garbage",
             "manifest_oversized", "manifest_of_another_repo", "pointing_elsewhere", "too_large",
             "bundle_missing"]  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES)
async def test_a_broken_snapshot_is_a_miss_logged_once(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig,
    fake_github: FakeGitHub, caplog: pytest.LogCaptureFixture, breakage: str,
) -> None:  # fmt: skip
    a, b = replicas("a"), replicas("b", max_snapshot_size=8 << 20)
    assert await a.publish(await a.fill(upstream)) == "published"
    namespace, bucket = Namespace.of(PREFIX, KEY), settings.bucket
    object_key = json.loads(s3.read(bucket, namespace.manifest_key))["object_key"]
    bundle = s3.read(bucket, object_key)
    if breakage == "corrupt":
        s3.write(bucket, object_key, flip_a_byte(bundle))
    elif breakage == "truncated":
        s3.write(bucket, object_key, bundle[: len(bundle) // 2])
    elif breakage == "longer":  # more bytes than the manifest says: the snapshot's fault, not the bucket's
        s3.write(bucket, object_key, bundle + b"\0" * 1024)
    elif breakage == "replaced_and_rehashed":  # a pack git refuses, under a manifest that matches it
        broken = flip_a_byte(bundle)
        s3.write(bucket, object_key, broken)
        rewrite_manifest(s3, bucket, namespace, sha256=hashlib.sha256(broken).hexdigest())
    elif breakage == "refs_not_the_manifests":
        rewrite_manifest(s3, bucket, namespace, refs_digest="0" * 64)
    elif breakage == "manifest_garbage":
        s3.write(bucket, namespace.manifest_key, b'{"version": 1, "repo_key": [[[[')
    elif breakage == "manifest_oversized":
        s3.write(bucket, namespace.manifest_key, b" " * (MAX_MANIFEST + 1))
    elif breakage == "manifest_of_another_repo":
        rewrite_manifest(s3, bucket, namespace, repo_key="github.com/acme/other")
    elif breakage == "pointing_elsewhere":
        rewrite_manifest(s3, bucket, namespace, object_key=f"{PREFIX}/v1/{'0' * 32}/bundles/" + object_key[-41:])
    elif breakage == "too_large":
        rewrite_manifest(s3, bucket, namespace, size=9 << 20)
    elif breakage == "bundle_missing":
        s3.delete(bucket, object_key)

    for _ in range(2):
        restored, incoming = await b.restore()
        assert restored is None and not incoming.exists()
    assert b.metrics.restores("refused") == 2
    assert len(warnings(caplog)) == 1, warnings(caplog)


async def test_a_bundle_holding_more_than_its_refs_reach_restores_unclean(
    replicas: Callable[..., Replica], upstream: str, s3: SeaweedS3, settings: SnapshotsConfig, tmp_path: Path
) -> None:
    """A hand-made bundle may carry objects no ref of it reaches (another repo's, say). They pass git's checks, but
    the mirror must then not count as clean: each want is checked against upstream's refs, as after a rewind."""
    a = replicas("a")
    slot = await a.fill(upstream)
    assert await a.publish(slot) == "published"
    namespace, bucket = Namespace.of(PREFIX, KEY), settings.bucket
    manifest = json.loads(s3.read(bucket, namespace.manifest_key))
    header = s3.read(bucket, manifest["object_key"]).split(b"\n\n", 1)[0] + b"\n\n"
    blob = git("hash-object", "-w", "--stdin", cwd=slot.path, input=b"an object of somewhere else\n").strip()
    reachable = git("rev-list", "--objects", "--all", cwd=slot.path).splitlines()
    ids = b"".join(line.split(b" ")[0] + b"\n" for line in reachable) + blob + b"\n"
    pack = git("pack-objects", "--stdout", "-q", cwd=slot.path, input=ids)
    crafted = header + pack
    s3.write(bucket, manifest["object_key"], crafted)
    rewrite_manifest(s3, bucket, namespace, sha256=hashlib.sha256(crafted).hexdigest(), size=len(crafted))

    restored, incoming = await replicas("b").restore()
    assert restored is not None and not restored.clean
    assert git("cat-file", "-t", blob.decode(), cwd=incoming).strip() == b"blob"


# ---------------------------------------------------------------- a bucket that is away or refuses


async def test_a_denied_bucket_is_a_miss_logged_once(
    replicas: Callable[..., Replica], upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = replicas("a")
    assert await a.publish(await a.fill(upstream)) == "published"
    denied = replicas("denied", identity=NOBODY)
    for _ in range(3):
        restored, incoming = await denied.restore()
        assert restored is None and not incoming.exists()
    assert denied.metrics.restores("failed") == 1 and denied.metrics.restores("skipped") == 2
    assert len(warnings(caplog)) == 1 and "denied" in warnings(caplog)[0]
    assert await denied.publish(await denied.fill(upstream)) == "failed"  # no write either


async def test_a_stopped_server_is_a_miss_and_its_return_is_noticed(
    tmp_path: Path, upstream: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SeaweedS3(tmp_path / "own-s3") as s3:
        settings = SnapshotsConfig(url=f"s3://{s3.make_bucket('away-and-back')}/p", endpoint=s3.endpoint)
        a, b = Replica(tmp_path / "a", settings, ADMIN), Replica(tmp_path / "b", settings, ADMIN)
        try:
            assert await a.publish(await a.fill(upstream)) == "published"
            s3.stop()
            monkeypatch.setattr(snapshot_health, "BREAK_FOR", 0.0)  # every restore probes the bucket
            for _ in range(2):
                restored, incoming = await b.restore()
                assert restored is None and not incoming.exists()
            assert b.metrics.restores("failed") == 2 and len(warnings(caplog)) == 1
            s3.start()
            restored, _ = await b.restore()
            assert restored is not None
            assert any("work again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
        finally:
            await a.snapshots.close()
            await b.snapshots.close()
