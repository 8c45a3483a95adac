"""The mirror cache through the real proxy: real git clients, the fake GitHub over real `git http-backend`.

Refs and the right to read come from upstream every time; only packs come from the mirror, and only while
upstream's recent word says that the credential may read the repo.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import PROXY
from proxy.testing import FakeGitHub
from tests.support import PRIVATE_FILES, STATIC_TOKEN, Git, Replicas, StartProxy, static_config

pytestmark = pytest.mark.timeout(300)


def mirror_config(fake: FakeGitHub, mirror_dir: Path, **mirror: Any) -> dict[str, Any]:
    config = static_config(fake.url)
    config["mirror"] = {"dir": str(mirror_dir), **mirror}
    return config


def blobs(size: int, count: int) -> dict[str, bytes]:
    return {f"blob-{i}.bin": os.urandom(size) for i in range(count)}


def upstream_pack_bytes(fake: FakeGitHub) -> int:
    return fake.upload_pack_bytes


@pytest.fixture
def big_repo(fake_github: FakeGitHub) -> str:
    fake_github.create_repo("acme/private", {**PRIVATE_FILES, **blobs(512 * 1024, 8)})
    fake_github.add_token(STATIC_TOKEN, repos=["acme/private", "acme/other", "acme/third"])
    return "acme/private"


async def test_a_repeat_clone_comes_from_the_mirror_and_is_identical(
    fake_github: FakeGitHub, big_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "mirror"))
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "first")
    before = upstream_pack_bytes(fake_github)
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "second")
    repeat = upstream_pack_bytes(fake_github) - before
    assert repeat < 0.05 * 4 * 1024 * 1024, f"{repeat} bytes of pack from upstream on a repeat clone"
    await git("fsck", "--full", "--strict", cwd=git.workdir / "second")
    first = await git("rev-parse", "HEAD", cwd=git.workdir / "first")
    second = await git("rev-parse", "HEAD", cwd=git.workdir / "second")
    assert first.stdout == second.stdout
    assert (git.workdir / "second" / "blob-3.bin").read_bytes() == (git.workdir / "first" / "blob-3.bin").read_bytes()


async def test_new_upstream_commits_and_pushes_through_the_proxy_are_seen(
    fake_github: FakeGitHub, big_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "mirror"))
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "work")
    behind_the_back = fake_github.commit(big_repo, "upstream.txt", b"from upstream\n")
    await git("pull", "--quiet", "--ff-only", cwd=git.workdir / "work")
    assert (git.workdir / "work" / "upstream.txt").read_bytes() == b"from upstream\n"
    head = await git("rev-parse", "HEAD", cwd=git.workdir / "work")
    assert head.stdout.strip() == behind_the_back

    (git.workdir / "work" / "pushed.txt").write_text("through the proxy\n")
    await git("add", "pushed.txt", cwd=git.workdir / "work")
    await git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "push", cwd=git.workdir / "work")
    await git("push", "--quiet", "origin", "HEAD", cwd=git.workdir / "work")
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "after-push")
    assert (git.workdir / "after-push" / "pushed.txt").read_text() == "through the proxy\n"


async def test_protocols_depth_and_filters_are_served_from_the_mirror(
    fake_github: FakeGitHub, big_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "mirror"))
    url = f"{proxy}/github.com/{big_repo}"
    await git("clone", "--quiet", url, "warm")
    before = upstream_pack_bytes(fake_github)
    await git("-c", "protocol.version=0", "clone", "--quiet", url, "v0")
    await git("-c", "protocol.version=2", "clone", "--quiet", url, "v2")
    await git("clone", "--quiet", "--depth", "1", url, "shallow")
    await git("clone", "--quiet", "--filter=blob:none", url, "partial")
    assert upstream_pack_bytes(fake_github) - before < 200 * 1024, "these came from upstream, not the mirror"
    for name in ("v0", "v2", "shallow", "partial"):
        assert (git.workdir / name / "README.md").read_bytes() == PRIVATE_FILES["README.md"]
    depth = await git("rev-list", "--count", "HEAD", cwd=git.workdir / "shallow")
    assert depth.stdout.strip() == "1"


async def test_no_pack_leaves_the_mirror_once_upstream_refuses_the_credential(
    fake_github: FakeGitHub, big_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "mirror"))
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "allowed")
    head = (await git("rev-parse", "HEAD", cwd=git.workdir / "allowed")).stdout.strip()
    del fake_github.grants[STATIC_TOKEN]  # the token is revoked upstream

    refused = await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "refused", check=False)
    assert refused.returncode != 0
    # A client that skips the refs and asks for a pack it knows the id of gets none.
    request = b"0014command=fetch\n0001" + f"0032want {head}\n".encode() + b"0009done\n0000"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy}/github.com/{big_repo}.git/git-upload-pack",
            data=request,
            headers={"Git-Protocol": "version=2", "Content-Type": "application/x-git-upload-pack-request"},
        ) as answer,
    ):
        body = await answer.read()
    assert answer.status != 200 or b"packfile" not in body
    assert b"PACK" not in body


async def test_concurrent_cold_clones_cause_one_upstream_fetch(
    fake_github: FakeGitHub, big_repo: str, replicas: Replicas, git: Git, tmp_path: Path
) -> None:
    proxy = await replicas.start(mirror_config(fake_github, tmp_path / "mirror"))
    await asyncio.gather(*(git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", f"c{i}") for i in range(16)))
    for i in range(16):
        assert (git.workdir / f"c{i}" / "README.md").exists()
    registry = replicas.runners[0].app[PROXY].metrics.registry
    # One fetch made the mirror; the requests that came during it shared at most a couple more, for refs only.
    assert (registry.get_sample_value("git_token_proxy_mirror_fetches_total", {"result": "ok"}) or 0) <= 3
    served = {
        outcome: registry.get_sample_value("git_token_proxy_mirror_requests_total", {"outcome": outcome}) or 0
        for outcome in ("hit", "filled", "bypass")
    }
    assert served["bypass"] == 0 and served["hit"] + served["filled"] >= 16


async def test_a_mirror_whose_packs_vanish_still_gives_whole_clones(
    fake_github: FakeGitHub, big_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "mirror"))
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "first")
    packs = list((tmp_path / "mirror").rglob("objects/pack/*.pack"))
    assert packs, "the mirror holds no pack"
    for pack in packs:
        pack.unlink()
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "second")
    await git("fsck", "--full", cwd=git.workdir / "second")
    await git("clone", "--quiet", f"{proxy}/github.com/{big_repo}", "third")  # and the mirror was rebuilt
    await git("fsck", "--full", cwd=git.workdir / "third")


async def test_max_size_holds_across_three_repos(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    repos = ["acme/private", "acme/other", "acme/third"]
    for repo in repos:
        fake_github.create_repo(repo, blobs(1024 * 1024, 2))
    fake_github.add_token(STATIC_TOKEN, repos=repos)
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "mirror", maxSize="5MiB"))
    for i, repo in enumerate(repos * 2):
        await git("clone", "--quiet", f"{proxy}/github.com/{repo}", f"c{i}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(2)  # the maintenance loop evicts in the background
    used = sum(f.stat().st_size for f in (tmp_path / "mirror").rglob("*") if f.is_file())
    assert used <= 5 * 1024 * 1024 + 512 * 1024, f"{used} bytes on disk"
