"""Snapshots' parts that need no mirror: the config, the key layout, the bundle header and manifest checks, how the
bucket's failures are logged, and the object-store client against a real S3 server (SeaweedFS): bounded reads,
conditional writes, the lock, and how the library's failures are named. Publishing and restoring are in
test_snapshots_core.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.config.mirror import SnapshotsConfig
from proxy.mirror.objectstore import (
    AccessDenied,
    BucketMissing,
    ObjectMissing,
    ObjectStore,
    ObjectTooLarge,
    PreconditionFailed,
    StaticCredentials,
    StoreUnreachable,
)
from proxy.mirror.snapshot_format import (
    BundleHeaderReader,
    Manifest,
    Namespace,
    SnapshotRefused,
    parse_bundle_header,
    parse_manifest,
    refs_digest,
)
from proxy.mirror.snapshot_health import BucketHealth
from proxy.mirror.store import MirrorStore
from proxy.testing.s3 import ADMIN, NOBODY, READER, S3Identity, SeaweedS3

ROOT = Path(__file__).parent.parent
A, B = "a" * 40, "b" * 40


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    return s3.make_bucket(f"test-{secrets.token_hex(6)}")


def store_as(s3: SeaweedS3, bucket: str, identity: S3Identity = ADMIN) -> ObjectStore:
    return ObjectStore(bucket, endpoint=s3.endpoint, credentials=StaticCredentials(identity.access_key,
                                                                                  identity.secret_key))  # fmt: skip


# ---------------------------------------------------------------- the config


def test_the_config_reads_camel_case_keys_sizes_and_durations() -> None:
    settings = SnapshotsConfig.model_validate({
        "url": "s3://build-cache/git-token-proxy/", "endpoint": "http://minio.infra:9000/", "region": "us-east-1",
        "publishEvery": "30m", "maxSnapshotSize": "1GiB", "restoreTimeout": "2m",
    })  # fmt: skip
    assert (settings.bucket, settings.prefix, settings.endpoint) == ("build-cache", "git-token-proxy",
                                                                     "http://minio.infra:9000")  # fmt: skip
    assert (settings.publish_every, settings.max_snapshot_size, settings.restore_timeout) == (1800, 1 << 30, 120)
    defaults = SnapshotsConfig(url="s3://build-cache")
    assert (defaults.prefix, defaults.publish, defaults.publish_every) == ("", True, 3600)


@pytest.mark.parametrize(
    "changes",
    [
        {"url": "https://build-cache/x"},
        {"url": "s3://Build-Cache/x"},  # upper case
        {"url": "s3://bc/x"},  # too short
        {"url": "s3://a..b/x"},
        {"url": "s3://192.168.1.1/x"},
        {"url": "s3://build-cache/../other"},
        {"url": "s3://build-cache/a//b"},
        {"url": "s3://build-cache/a?b"},
        {"url": "s3://build-cache/%2e%2e/b"},
        {"url": "s3://build-cache/" + "a" * 600},
        {"endpoint": "ftp://minio:9000"},
        {"endpoint": "http://AKIA:secret@minio:9000"},  # credentials never in the config
        {"endpoint": "http://minio:9000/bucket"},
        {"endpoint": "http://minio:99999"},
        {"region": "us east 1"},
        {"maxSnapshotSize": "6GiB"},  # over what one PUT can hold
        {"publishEvery": "0s"},
        {"accessKey": "AKIA..."},  # no such key: credentials come from the AWS chain
    ],
)
def test_the_config_refuses(changes: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        SnapshotsConfig.model_validate({"url": "s3://build-cache/prefix", **changes})


# ---------------------------------------------------------------- keys


def test_each_upstream_path_has_a_namespace_of_its_own() -> None:
    team_a = MirrorStore.key_of("git.company.local/team-a/acme/app")
    team_b = MirrorStore.key_of("git.company.local/team-b/acme/app")
    assert team_a is not None and team_b is not None
    a, b = Namespace.of("fleet", team_a), Namespace.of("fleet", team_b)
    assert a.root != b.root and not a.owns(b.new_bundle_key()) and not b.owns(a.new_bundle_key())
    assert Namespace.of("fleet", "github.com/acme/app") == Namespace.of("fleet", "github.com/acme/app")


@given(st.text(min_size=1, max_size=300), st.sampled_from(["", "p", "fleet/git-token-proxy"]))
def test_keys_built_from_any_repo_name_stay_under_the_prefix(key: str, prefix: str) -> None:
    namespace = Namespace.of(prefix, key)
    under = re.escape(f"{prefix}/" if prefix else "")
    shape = re.compile(rf"{under}v1/[0-9a-f]{{32}}/(manifest\.json|publishing\.lock|bundles/[0-9]{{8}}T[0-9]{{6}}Z-"
                       r"[0-9a-f]{16}\.bundle)")  # fmt: skip
    for object_key in (namespace.manifest_key, namespace.lock_key, namespace.new_bundle_key()):
        assert shape.fullmatch(object_key), object_key
    assert namespace.owns(namespace.new_bundle_key())


@pytest.mark.parametrize(
    "object_key",
    [
        "v1/{id}/bundles/../../other/bundles/20250101T000000Z-0123456789abcdef.bundle",
        "v1/{id}/bundles/x.bundle",
        "v1/{id}/manifest.json",
        "v1/0123456789abcdef0123456789abcdef/bundles/20250101T000000Z-0123456789abcdef.bundle",
        "/etc/passwd",
    ],
)
def test_a_namespace_owns_only_bundle_names_beside_it(object_key: str) -> None:
    namespace = Namespace.of("", "github.com/acme/app")
    assert not namespace.owns(object_key.format(id=namespace.id))


# ---------------------------------------------------------------- the bundle header and the manifest


def test_a_bundle_header_gives_its_refs_and_leaves_head_out() -> None:
    header = f"# v2 git bundle\n{A} HEAD\n{A} refs/heads/main\n{B} refs/pull/1/head".encode()
    assert parse_bundle_header(header) == [(A, "refs/heads/main"), (B, "refs/pull/1/head")]
    reader = BundleHeaderReader()
    assert reader.feed(header[:20]) is None
    assert reader.feed(header[20:] + b"\n\nPACK\x00rest") == b"PACK\x00rest"
    assert reader.refs == [(A, "refs/heads/main"), (B, "refs/pull/1/head")]


@pytest.mark.parametrize(
    "header",
    [
        b"# v3 git bundle\n@object-format=sha1\n" + A.encode() + b" refs/heads/main",
        b"# v2 git bundle\n-" + A.encode() + b" a prerequisite\n" + B.encode() + b" refs/heads/main",
        b"# v2 git bundle\n" + A.encode() + b" HEAD",  # no refs
        b"# v2 git bundle\n" + A.encode() + b" refs/heads/with space",
        b"# v2 git bundle\n" + A.encode() + b" config",  # outside refs/
        b"# v2 git bundle\n" + A.encode()[:39] + b" refs/heads/main",
        b"# v2 git bundle\n" + A.encode() + b" refs/heads/\xff",
        b"PACK",
    ],
)
def test_a_bundle_header_is_refused(header: bytes) -> None:
    with pytest.raises(SnapshotRefused):
        parse_bundle_header(header)


def test_a_header_without_end_is_refused_once_over_its_bound() -> None:
    reader = BundleHeaderReader()
    line = f"{A} refs/heads/{'x' * 200}\n".encode()
    with pytest.raises(SnapshotRefused):
        for _ in range(20 * (1 << 20) // len(line)):
            reader.feed(line)


def manifest_for(where: Namespace, **changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "version": 1, "format": "git-bundle-v2", "repo_key": where.key, "namespace": where.id,
        "object_key": where.new_bundle_key(), "size": 10, "sha256": "0" * 64,
        "refs_digest": refs_digest([(A, "refs/heads/main")]), "created": 1.7e9,
    }  # fmt: skip
    return {**fields, **changes}


def test_a_manifest_binds_only_to_its_own_namespace() -> None:
    ours, theirs = Namespace.of("p", "github.com/acme/app"), Namespace.of("p", "github.com/acme/other")
    assert Manifest.model_validate(manifest_for(ours)).binds(ours)
    copied = Manifest.model_validate(manifest_for(theirs))
    assert not copied.binds(ours)  # copied from another namespace: it names the other repo
    pointing_away = Manifest.model_validate(manifest_for(ours, object_key=theirs.new_bundle_key()))
    assert not pointing_away.binds(ours)
    lying = Manifest.model_validate(manifest_for(ours, namespace=theirs.id))
    assert not lying.binds(ours)
    assert parse_manifest(json.dumps(manifest_for(ours)).encode(), ours) is not None
    assert parse_manifest(json.dumps(manifest_for(theirs)).encode(), ours) is None  # well formed, but not ours
    assert parse_manifest(b'{"version": 1', ours) is None


@pytest.mark.parametrize(
    "changes",
    [{"version": 2}, {"size": "10"}, {"size": -1}, {"sha256": "X" * 64}, {"created": "yesterday"}, {"extra": 1},
     {"format": "tar"}],
)  # fmt: skip
def test_a_malformed_manifest_does_not_parse(changes: dict[str, object]) -> None:
    data = json.dumps(manifest_for(Namespace.of("", "github.com/acme/app"), **changes))
    with pytest.raises(ValidationError):
        Manifest.model_validate_json(data)


# ---------------------------------------------------------------- the bucket's health


def test_the_bucket_is_logged_once_per_kind_of_failure_and_the_breaker_only_when_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure's wording may change each time (a byte count, an address): only its kind counts as a change."""
    caplog.set_level(logging.INFO, "git_token_proxy.snapshots")
    health = BucketHealth("restores")
    for free in (1000, 2000, 3000):
        health.failed(OSError(f"{free} bytes free on the mirror's disk, too few for a 5000-byte snapshot"), False)
    assert health.usable  # a full disk is no reason to keep off the bucket
    health.failed(AccessDenied("AccessDenied (403)"), breaks=True)
    health.failed(AccessDenied("AccessDenied (403), again"), breaks=True)
    assert not health.usable
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2 and "1000 bytes free" in said[0] and "denied: AccessDenied (403)" in said[1]
    health.succeeded("s3://bucket/prefix")
    assert [r.getMessage() for r in caplog.records][-1] == "snapshot restores work again (s3://bucket/prefix)"
    health.failed(AccessDenied("AccessDenied (403)"), breaks=False)
    assert sum(1 for r in caplog.records if r.levelno >= logging.WARNING) == 3  # failing after working: a change


# ---------------------------------------------------------------- the object store


async def test_reads_are_bounded_and_writes_conditional(s3: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    store = store_as(s3, bucket)
    try:
        etag = await store.put_bytes("k/one", b"first", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await store.put_bytes("k/one", b"second", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await store.put_bytes("k/one", b"third", if_match='"not-its-etag"')
        await store.put_bytes("k/one", b"fourth", if_match=etag)
        data, info = await store.read_small("k/one", 100)
        assert (data, info.size) == (b"fourth", 6)
        with pytest.raises(ObjectTooLarge):
            await store.read_small("k/one", 5)
        with pytest.raises(ObjectMissing):
            await store.read_small("k/none", 5)

        source = tmp_path / "source.bin"
        source.write_bytes(os.urandom(3 << 20))
        await store.upload("k/file", source)
        await store.download("k/file", tmp_path / "back.bin", 3 << 20)
        assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
        assert [item.key for item in await store.list("k/")] == ["k/file", "k/one"]
        await store.delete("k/file")
        await store.delete("k/file")  # not there: not an error
        assert [item.key for item in await store.list("k/")] == ["k/one"]
    finally:
        await store.close()


async def test_one_lock_holder_at_a_time_and_a_stale_lock_is_taken_over(s3: SeaweedS3, bucket: str) -> None:
    first, second = store_as(s3, bucket), store_as(s3, bucket)
    try:
        async with first.lock("a.lock", lifetime=600) as held:
            assert held
            async with second.lock("a.lock", lifetime=600) as also:
                assert not also
        async with second.lock("a.lock", lifetime=600) as held:  # given back
            assert held
        s3.write(bucket, "b.lock", b"left behind by a replica that died")
        await asyncio.sleep(1.1)
        async with first.lock("b.lock", lifetime=0.5) as taken:
            assert taken
        assert "b.lock" not in s3.keys(bucket)
    finally:
        await first.close()
        await second.close()


async def test_failures_are_named(s3: SeaweedS3, bucket: str) -> None:
    s3.write(bucket, "k", b"x")
    stores = [store_as(s3, bucket, NOBODY), store_as(s3, bucket, READER), store_as(s3, "no-such-bucket"),
              ObjectStore(bucket, endpoint="http://127.0.0.1:9", credentials=StaticCredentials("a", "b"))]  # fmt: skip
    nobody, reader, elsewhere, nowhere = stores
    try:
        with pytest.raises(AccessDenied):
            await nobody.read_small("k", 10)
        assert (await reader.read_small("k", 10))[0] == b"x"
        with pytest.raises(AccessDenied):
            await reader.put_bytes("k", b"y")
        with pytest.raises(BucketMissing):
            await elsewhere.read_small("k", 10)
        with pytest.raises(StoreUnreachable):
            await nowhere.read_small("k", 10)
    finally:
        for store in stores:
            await store.close()


async def test_the_standard_aws_chain_reads_the_environment(
    s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Also: at DEBUG, botocore would log each request's headers (a session token with IRSA): it logs nothing."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-session-token-that-must-never-be-logged")
    for name, value in ADMIN.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    store = ObjectStore(bucket, endpoint=s3.endpoint)
    try:
        with pytest.raises(AccessDenied):  # SeaweedFS knows no such session token: the chain did pass it on
            await store.put_bytes("from-env", b"ok")
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        await store.close()
        await store.put_bytes("from-env", b"ok")
        assert s3.read(bucket, "from-env") == b"ok"
    finally:
        await store.close()
    assert "a-session-token" not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith(("botocore", "aiobotocore")) and r.levelno < 30]


# ---------------------------------------------------------------- the cost of not using it


def test_botocore_is_loaded_only_once_a_store_is_used() -> None:
    script = """
import asyncio, sys
import proxy.mirror.snapshots, proxy.mirror.objectstore
before = sorted(m for m in sys.modules if m.split(".")[0] in ("botocore", "aiobotocore", "boto3"))
store = proxy.mirror.objectstore.ObjectStore("bucket-name", endpoint="http://127.0.0.1:9")
try:
    asyncio.run(store.read_small("k", 1))
except proxy.mirror.objectstore.ObjectStoreError:
    pass
after = "aiobotocore" in sys.modules
print(before, after)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True"]
