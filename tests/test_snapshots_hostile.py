"""Snapshots against a hostile storage host and a hostile bucket writer (issue 23's red team): a store that redirects
(the session token must not follow), one that trickles, a snapshot that costs git more than restoreTimeout, a
restore cancelled while git is slow, and an upstream that fails behind every restore."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config.mirror import SnapshotsConfig
from proxy.metrics import Metrics
from proxy.mirror import snapshots as snapshots_module
from proxy.mirror.fill import MirrorFiller
from proxy.mirror.gitrun import MirrorGit
from proxy.mirror.objectstore import StoreTimeout
from proxy.mirror.snapshot_format import Manifest, Namespace, refs_digest
from proxy.mirror.snapshot_unpack import BUCKET_WINDOW, IndexPack, Progress
from proxy.testing import FakeGitHub
from proxy.testing.s3 import ADMIN, SeaweedS3
from tests.support import UpstreamApp
from tests.test_snapshots_core import KEY, TOKEN, Replica, warnings

pytestmark = pytest.mark.timeout(180)


def replica_of(tmp_path: Path, endpoint: str, **settings: object) -> Replica:
    config = SnapshotsConfig.model_validate({"url": "s3://bucket/prefix", "endpoint": endpoint, **settings})
    return Replica(tmp_path / f"replica-{os.urandom(4).hex()}", config, ADMIN)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_store_that_redirects_fails_the_restore_and_nothing_follows_the_redirect(
    tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture, upstream_app: UpstreamApp
) -> None:
    seen: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=404)

    other = await upstream_app(elsewhere)

    async def redirecting(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": other + request.path_qs})

    replica = replica_of(tmp_path, await upstream_app(redirecting))  # a storage host that says what it likes
    try:
        restored, incoming = await replica.restore()
    finally:
        await replica.snapshots.close()
    assert restored is None and not incoming.exists()
    assert seen == []  # no request, so no signature and no session token, reached the other host
    assert replica.metrics.restores("failed") == 1
    assert any(f"HTTP {status}, a redirect: not followed" in line for line in warnings(caplog))


async def test_a_store_that_trickles_fails_within_the_manifest_deadline_and_the_next_restores_skip_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream_app: UpstreamApp
) -> None:
    async def trickling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Length": "60000"})
        await response.prepare(request)
        while True:  # a byte at a time, well inside the client's read timeout
            await response.write(b" ")
            await asyncio.sleep(0.1)

    monkeypatch.setattr(snapshots_module, "MANIFEST_TIMEOUT", 0.5)
    replica = replica_of(tmp_path, await upstream_app(trickling))
    try:
        started = time.monotonic()
        assert (await replica.restore())[0] is None
        assert time.monotonic() - started < 30  # not restoreTimeout's 300 s
        assert (await replica.restore("github.com/acme/other"))[0] is None
    finally:
        await replica.snapshots.close()
    assert replica.metrics.restores("failed") == 1 and replica.metrics.restores("skipped") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_under_the_floor_is_given_up_and_gits_time_is_not_the_buckets() -> None:
    clock = Clock()
    progress = Progress(clock)
    for _ in range(3):  # git is slow: 100 s on each chunk, and the bucket is quick
        clock.now += 0.1
        progress.on_bucket(64 * 1024)
        progress.on_git()
        clock.now += 100
        progress.back_to_bucket()
    clock.now += BUCKET_WINDOW / 2
    progress.on_bucket(1)
    clock.now += BUCKET_WINDOW / 2
    with pytest.raises(StoreTimeout, match="the bucket sent"):
        progress.on_bucket(1)


async def test_a_restore_cancelled_while_git_is_slow_writes_nothing_after_it_closes(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror.git"
    assert (await MirrorGit(tmp_path / "home", None).init_bare(mirror)).returncode == 0
    indexing = await IndexPack.start(mirror, 64 << 20, dict(os.environ))
    os.kill(indexing._process.pid, signal.SIGSTOP)  # git reads nothing: the pipe fills, the write blocks
    feeding = asyncio.create_task(indexing.feed(b"PACK" + os.urandom(16 << 20)))
    await asyncio.sleep(0.3)
    feeding.cancel()
    await indexing.close()
    # Whatever file now takes the pipe's descriptor number gets none of the bundle's bytes.
    opened = [os.open(tmp_path / f"other-{n}", os.O_RDWR | os.O_CREAT) for n in range(4)]
    await asyncio.sleep(0.3)
    assert all(os.fstat(fd).st_size == 0 for fd in opened)
    for fd in opened:
        os.close(fd)


# ---------------------------------------------------------------- against the real bucket


def inflating_bundle(inflated: int) -> tuple[bytes, list[tuple[str, str]]]:
    """A bundle whose pack is one blob of `inflated` zero bytes: about a thousandth of that on the wire."""
    compressor, zeros, body = zlib.compressobj(1), bytes(1 << 20), bytearray()
    for _ in range(inflated >> 20):
        body += compressor.compress(zeros)
    body += compressor.flush()
    size, header = inflated, bytearray()
    byte = (3 << 4) | (size & 0x0F)  # type 3: a blob
    size >>= 4
    while size:
        header.append(byte | 0x80)
        byte, size = size & 0x7F, size >> 7
    header.append(byte)
    pack = b"PACK" + struct.pack(">II", 2, 1) + bytes(header) + bytes(body)
    pack += hashlib.sha1(pack).digest()  # git's pack trailer
    refs = [("1" * 40, "refs/heads/main")]
    return b"# v2 git bundle\n" + "".join(f"{oid} {name}\n" for oid, name in refs).encode() + b"\n" + pack, refs


@pytest.fixture(scope="module")
def bomb() -> tuple[bytes, list[tuple[str, str]]]:
    return inflating_bundle(1 << 30)  # 1 GiB to inflate and hash: seconds of git for 1 MiB of bucket


def slow_replica(tmp_path: Path, s3: SeaweedS3, bucket: str) -> Replica:
    return Replica(tmp_path / "r", SnapshotsConfig(url=f"s3://{bucket}/p", endpoint=s3.endpoint, restore_timeout=1.0),
                   ADMIN)  # fmt: skip


def publish_by_hand(s3: SeaweedS3, bucket: str, prefix: str, bundle: bytes, refs: list[tuple[str, str]]) -> None:
    namespace = Namespace.of(prefix, KEY)
    object_key = namespace.new_bundle_key()
    s3.write(bucket, object_key, bundle)
    manifest = Manifest(version=1, format="git-bundle-v2", repo_key=KEY, namespace=namespace.id,
                        object_key=object_key, size=len(bundle), sha256=hashlib.sha256(bundle).hexdigest(),
                        refs_digest=refs_digest(refs), created=time.time())  # fmt: skip
    s3.write(bucket, namespace.manifest_key, manifest.model_dump_json().encode())


async def test_a_snapshot_that_costs_git_more_than_restore_timeout_is_refused_and_the_bucket_stays_in_use(
    s3: SeaweedS3, tmp_path: Path, caplog: pytest.LogCaptureFixture, bomb: tuple[bytes, list[tuple[str, str]]]
) -> None:
    bucket = s3.make_bucket("bombs")
    publish_by_hand(s3, bucket, "p", *bomb)
    replica = slow_replica(tmp_path, s3, bucket)
    try:
        await replica.snapshots.prepare()  # the S3 client's start (botocore's import) is no part of the budget
        for _ in range(2):
            restored, incoming = await replica.restore()
            assert restored is None and not incoming.exists()
    finally:
        await replica.snapshots.close()
    assert replica.metrics.restores("refused") == 2 and replica.metrics.restores("skipped") == 0
    assert len(warnings(caplog)) == 1 and "git took longer than restoreTimeout" in warnings(caplog)[0]


async def test_an_upstream_failing_behind_a_restore_costs_one_restore_per_pause(
    s3: SeaweedS3, tmp_path: Path, fake_github: FakeGitHub
) -> None:
    fake_github.add_token(TOKEN)  # the publisher's; the replica fetches with none
    fake_github.create_repo("acme/app", {"README.md": b"# app\n", "blob.bin": os.urandom(256 * 1024)})
    url = f"{fake_github.url}/acme/app.git"
    settings = SnapshotsConfig(url=f"s3://{s3.make_bucket('flaky-upstream')}/p", endpoint=s3.endpoint)
    publisher, replica = Replica(tmp_path / "a", settings, ADMIN), Replica(tmp_path / "b", settings, ADMIN)
    try:
        assert await publisher.publish(await publisher.fill(url)) == "published"
        filler = MirrorFiller(replica.mirrors, replica.git, Metrics(), lambda slot: None, lambda slot: None,
                              replica.snapshots)  # fmt: skip
        await replica.mirrors.prepare()
        slot = replica.mirrors.slot(KEY)
        for _ in range(3):  # no credential: upstream refuses the fetch behind the restore each time
            assert not await filler.sync(slot, url, None, time.monotonic())
        assert replica.metrics.restores("restored") == 1
        await filler.close()
    finally:
        await publisher.snapshots.close()
        await replica.snapshots.close()


async def test_a_pack_whose_index_would_not_fit_is_refused_before_git_reads_it(
    s3: SeaweedS3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3.make_bucket("many-objects")
    bundle, refs = inflating_bundle(1 << 20)
    pack_at = bundle.index(b"PACK")
    claimed = bundle[: pack_at + 8] + (100_000_000).to_bytes(4, "big") + bundle[pack_at + 12 :]
    publish_by_hand(s3, bucket, "p", claimed, refs)  # 100 million objects: a 3 GiB index for a 1 KiB pack
    replica = Replica(tmp_path / "r", SnapshotsConfig(url=f"s3://{bucket}/p", endpoint=s3.endpoint,
                                                      maxSnapshotSize="1GiB"), ADMIN)  # fmt: skip
    try:
        restored, incoming = await replica.restore()
    finally:
        await replica.snapshots.close()
    assert restored is None and not incoming.exists()
    assert replica.metrics.restores("refused") == 1
    assert "its pack and index would take 3200" in warnings(caplog)[0]


def test_a_steady_bucket_is_not_cut_while_a_long_bundle_header_arrives() -> None:
    clock = Clock()
    progress = Progress(clock)
    for _ in range(120):  # two minutes of header chunks (a repo with many refs) at 64 KiB/s: twice the floor
        clock.now += 1.0
        progress.on_bucket(64 * 1024)


async def test_a_snapshot_refused_for_gits_time_is_tried_again_later(
    s3: SeaweedS3, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    bomb: tuple[bytes, list[tuple[str, str]]],
) -> None:  # fmt: skip
    monkeypatch.setattr(snapshots_module, "SLOW_REFUSAL", 0.0)  # "later" is now: the replica may have been busy
    bucket = s3.make_bucket("slow-once")
    publish_by_hand(s3, bucket, "p", *bomb)
    replica = slow_replica(tmp_path, s3, bucket)
    try:
        await replica.snapshots.prepare()
        for _ in range(2):
            assert (await replica.restore())[0] is None
    finally:
        await replica.snapshots.close()
    assert len(warnings(caplog)) == 2  # downloaded and checked again, not refused from memory


def test_git_is_blamed_for_a_timeout_only_when_it_took_half_the_budget() -> None:
    clock = Clock()
    slow_bucket = Progress(clock)
    clock.now += 25  # the bucket took most of the budget
    slow_bucket.on_bucket(1 << 20)
    slow_bucket.on_git()
    clock.now += 5
    assert not slow_bucket.git_was_the_cost(30)
    slow_git = Progress(clock)
    slow_git.on_bucket(1 << 20)
    slow_git.on_git()
    clock.now += 20
    slow_git.back_to_bucket()
    slow_git.on_bucket(1 << 20)
    slow_git.on_git()
    clock.now += 5
    assert slow_git.git_was_the_cost(30)
