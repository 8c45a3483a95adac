"""Mirror snapshots through the real proxy: replicas with real git clients, the fake GitHub over real
`git http-backend`, and a real S3 server (SeaweedFS). A fresh replica starts from the fleet's snapshot plus the
delta; a snapshot never gives anything to a credential upstream refuses; any fault of the bucket or the snapshot
falls back to upstream; two upstream paths never share one."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.running import PROXY
from proxy.testing import FakeGitHub
from proxy.testing.s3 import ADMIN, NOBODY, S3Identity, SeaweedS3
from tests.e2e.nested_upstream import NestedUpstream, static_entry
from tests.support import PRIVATE_FILES, STATIC_TOKEN, Git, Replicas, static_config

pytestmark = pytest.mark.timeout(300)

REPO = "acme/private"
BLOB_BYTES = 4 * (1 << 20)


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    return s3.make_bucket(f"fleet-{secrets.token_hex(6)}")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The standard AWS chain as the proxy reads it, from the environment: `use(identity)` before a replica's first
    use of the bucket (its client reads the chain then). No files, no instance metadata."""

    def use(identity: S3Identity) -> None:
        for name, value in identity.env().items():
            monkeypatch.setenv(name, value)

    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    use(ADMIN)
    return use


@pytest.fixture
def big_repo(fake_github: FakeGitHub) -> str:
    fake_github.create_repo(REPO, {**PRIVATE_FILES, "blob.bin": os.urandom(BLOB_BYTES)})
    fake_github.add_token(STATIC_TOKEN, repos=[REPO])
    return REPO


def replica_config(fake: FakeGitHub, mirror_dir: Path, s3: SeaweedS3, bucket: str, **snapshots: Any) -> dict[str, Any]:
    config = static_config(fake.url)
    config["mirror"] = {"dir": str(mirror_dir),
                        "snapshots": {"url": f"s3://{bucket}/fleet", "endpoint": s3.endpoint, **snapshots}}  # fmt: skip
    return config


def counter(replicas: Replicas, index: int, name: str, result: str | None = None) -> float:
    registry = replicas.runners[index].app[PROXY].metrics.registry
    value = registry.get_sample_value(name, {"result": result} if result else {})
    return value if value is not None else 0.0


async def published(replicas: Replicas, index: int, seconds: float = 60) -> None:
    """Until replica `index` has published (in the background, after its fill)."""
    deadline = time.monotonic() + seconds
    while counter(replicas, index, "git_token_proxy_snapshot_publishes_total", "published") < 1:
        assert time.monotonic() < deadline, "no snapshot was published"
        await asyncio.sleep(0.1)


async def a_replica_has_published(fake: FakeGitHub, replicas: Replicas, git: Git, tmp_path: Path, s3: SeaweedS3,
                                  bucket: str) -> None:  # fmt: skip
    proxy = await replicas.start(replica_config(fake, tmp_path / "a", s3, bucket))
    await git("clone", "--quiet", "--bare", f"{proxy}/github.com/{REPO}", "a.git")
    await published(replicas, 0)


def bundle_key(s3: SeaweedS3, bucket: str) -> tuple[str, str]:
    manifest = next(key for key in s3.keys(bucket) if key.endswith("manifest.json"))
    return manifest, json.loads(s3.read(bucket, manifest))["object_key"]


async def test_a_fresh_replica_clones_from_the_snapshot_and_the_delta(
    fake_github: FakeGitHub, big_repo: str, replicas: Replicas, git: Git, tmp_path: Path, s3: SeaweedS3,
    bucket: str, aws: Any,
) -> None:  # fmt: skip
    await a_replica_has_published(fake_github, replicas, git, tmp_path, s3, bucket)
    newer = fake_github.commit(REPO, "after.txt", b"pushed after the snapshot\n")

    proxy = await replicas.start(replica_config(fake_github, tmp_path / "b", s3, bucket))
    before = fake_github.upload_pack_bytes
    await git("clone", "--quiet", f"{proxy}/github.com/{REPO}", "b")
    taken = fake_github.upload_pack_bytes - before
    assert taken < 0.05 * BLOB_BYTES, f"{taken} bytes of pack from upstream with a warm bucket"
    assert counter(replicas, 1, "git_token_proxy_snapshot_restores_total", "restored") == 1
    await git("fsck", "--full", "--strict", cwd=git.workdir / "b")
    assert (await git("rev-parse", "HEAD", cwd=git.workdir / "b")).stdout.strip() == newer
    await git("clone", "--quiet", f"{fake_github.url.replace('://', f'://x:{STATIC_TOKEN}@')}/{REPO}.git", "direct")
    for name in ("blob.bin", "after.txt", "README.md"):
        assert (git.workdir / "b" / name).read_bytes() == (git.workdir / "direct" / name).read_bytes()


async def test_a_credential_upstream_refuses_gets_nothing_from_the_snapshot(
    fake_github: FakeGitHub, big_repo: str, replicas: Replicas, git: Git, tmp_path: Path, s3: SeaweedS3,
    bucket: str, aws: Any,
) -> None:  # fmt: skip
    await a_replica_has_published(fake_github, replicas, git, tmp_path, s3, bucket)
    head = fake_github.head(REPO)
    del fake_github.grants[STATIC_TOKEN]  # revoked upstream
    proxy = await replicas.start(replica_config(fake_github, tmp_path / "b", s3, bucket))

    refused = await git("clone", "--quiet", f"{proxy}/github.com/{REPO}", "refused", check=False)
    assert refused.returncode != 0
    request = b"0014command=fetch\n0001" + f"0032want {head}\n".encode() + b"0009done\n0000"
    headers = {"Git-Protocol": "version=2", "Content-Type": "application/x-git-upload-pack-request"}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the first may start a fill (which restores, then fails upstream); the second finds none
            async with session.post(f"{proxy}/github.com/{REPO}.git/git-upload-pack", data=request,
                                    headers=headers) as answer:  # fmt: skip
                body = await answer.read()
            assert b"PACK" not in body
    assert not list((tmp_path / "b").rglob("private.git/HEAD")), "a mirror was installed without upstream's word"


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "no_manifest", "denied"])
async def test_a_broken_snapshot_or_bucket_falls_back_to_upstream(
    fake_github: FakeGitHub, big_repo: str, replicas: Replicas, git: Git, tmp_path: Path, s3: SeaweedS3,
    bucket: str, aws: Any, fault: str,
) -> None:  # fmt: skip
    await a_replica_has_published(fake_github, replicas, git, tmp_path, s3, bucket)
    manifest, bundle = bundle_key(s3, bucket)
    if fault == "corrupt":
        data = s3.read(bucket, bundle)
        s3.write(bucket, bundle, data[: len(data) // 2] + b"\x00" * 64 + data[len(data) // 2 + 64 :])
    elif fault == "truncated":
        s3.write(bucket, bundle, s3.read(bucket, bundle)[:-100_000])
    elif fault == "no_manifest":
        s3.delete(bucket, manifest)
    else:
        aws(NOBODY)

    proxy = await replicas.start(replica_config(fake_github, tmp_path / "b", s3, bucket))
    before = fake_github.upload_pack_bytes
    await git("clone", "--quiet", f"{proxy}/github.com/{REPO}", "b")
    assert fake_github.upload_pack_bytes - before > BLOB_BYTES  # the whole pack, from upstream
    await git("fsck", "--full", cwd=git.workdir / "b")
    assert counter(replicas, 1, "git_token_proxy_snapshot_restores_total", "restored") == 0
    assert (git.workdir / "b" / "blob.bin").stat().st_size == BLOB_BYTES


async def test_a_stopped_bucket_falls_back_to_upstream(
    fake_github: FakeGitHub, big_repo: str, replicas: Replicas, git: Git, tmp_path: Path, aws: Any
) -> None:
    with SeaweedS3(tmp_path / "own-s3") as s3:
        bucket = s3.make_bucket("stopped-bucket")
        await a_replica_has_published(fake_github, replicas, git, tmp_path, s3, bucket)
        s3.stop()
        proxy = await replicas.start(replica_config(fake_github, tmp_path / "b", s3, bucket))
        await git("clone", "--quiet", f"{proxy}/github.com/{REPO}", "b")
    await git("fsck", "--full", cwd=git.workdir / "b")
    assert counter(replicas, 1, "git_token_proxy_snapshot_restores_total", "failed") == 1


async def test_two_replicas_filling_at_once_leave_one_good_snapshot(
    fake_github: FakeGitHub, big_repo: str, replicas: Replicas, git: Git, tmp_path: Path, s3: SeaweedS3,
    bucket: str, aws: Any,
) -> None:  # fmt: skip
    proxies = [await replicas.start(replica_config(fake_github, tmp_path / name, s3, bucket)) for name in "ab"]
    await asyncio.gather(*(git("clone", "--quiet", "--bare", f"{p}/github.com/{REPO}", f"{i}.git")
                           for i, p in enumerate(proxies)))  # fmt: skip
    deadline = time.monotonic() + 60
    while sum(counter(replicas, i, "git_token_proxy_snapshot_publishes_total", r) for i in (0, 1)
              for r in ("published", "busy", "lost_race", "unchanged", "recent")) < 2:  # fmt: skip
        assert time.monotonic() < deadline, "the publishes did not end"
        await asyncio.sleep(0.1)
    keys = s3.keys(bucket)
    assert sum(1 for k in keys if k.endswith("manifest.json")) == 1 and sum(1 for k in keys if "/bundles/" in k) == 1

    proxy = await replicas.start(replica_config(fake_github, tmp_path / "c", s3, bucket))
    await git("clone", "--quiet", f"{proxy}/github.com/{REPO}", "c")
    assert counter(replicas, 2, "git_token_proxy_snapshot_restores_total", "restored") == 1


async def test_another_upstream_paths_replica_gets_nothing_of_a_snapshot(
    tmp_path: Path, replicas: Replicas, git: Git, s3: SeaweedS3, bucket: str, aws: Any
) -> None:
    """Team A's repo is published; a replica serving team B's same-named repo neither restores it nor serves its
    objects to team B's credential (the cross-baseUrl rule of the mirror, carried to the bucket)."""
    upstream = NestedUpstream(tmp_path / "up")
    (tmp_path / "up").mkdir()
    await upstream.start()
    try:
        secret = upstream.create("team-a/acme/app", {"secret.txt": b"TEAM A SECRET\n"}, {"token-a-1111"})
        upstream.create("team-b/acme/app", {"readme.txt": b"team b\n"}, {"token-b-2222"})

        def config(mirror_dir: Path) -> dict[str, Any]:
            snapshots = {"url": f"s3://{bucket}/fleet", "endpoint": s3.endpoint}
            return {
                "upstreams": [{"host": "git.company.local", "url": upstream.url, "anonymous": False}],
                "github": {"appInstallation": {"auth": [
                    static_entry("team-a", r"(?<baseUrl>git\.company\.local/team-a)/.*", "token-a-1111"),
                    static_entry("team-b", r"(?<baseUrl>git\.company\.local/team-b)/.*", "token-b-2222"),
                ]}},
                "mirror": {"dir": str(mirror_dir), "snapshots": snapshots},
            }  # fmt: skip

        first = await replicas.start(config(tmp_path / "a"))
        await git("clone", "--quiet", f"{first}/git.company.local/team-a/acme/app", "victim")
        await published(replicas, 0)
        second = await replicas.start(config(tmp_path / "b"))
        await git("init", "--quiet", "attacker")
        attacker = git.workdir / "attacker"
        await git("fetch", f"{second}/git.company.local/team-b/acme/app", secret, cwd=attacker, check=False)
        shown = await git("cat-file", "-p", f"{secret}:secret.txt", cwd=attacker, check=False)
    finally:
        await upstream.close()
    assert "TEAM A SECRET" not in shown.stdout
    assert counter(replicas, 1, "git_token_proxy_snapshot_restores_total", "restored") == 0
