"""Git LFS through the proxy with the real git-lfs client: objects carried via /_lfs/ handles to a storage host
that only the proxy can reach, with the storage credential kept inside the proxy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.testing import FakeGitHub
from proxy.testing.fake_lfs import FakeLfs
from tests.support import Git, StartProxy, static_config

MiB = 1024 * 1024
REPO = "acme/private"
CLIENT_A, CLIENT_B = "client-a-token-0123456789", "client-b-token-0123456789"


def lfs_config(fake: FakeGitHub, storage: FakeLfs, **overrides: Any) -> dict[str, Any]:
    """The storage host the batch answer names does not resolve; only this mapping reaches it."""
    lfs = {"proxyObjects": True, "storageHosts": [{"host": storage.href_host, "url": storage.storage_url}]}
    return static_config(fake.url, lfs=lfs, **overrides)


def read_only(config: dict[str, Any]) -> dict[str, Any]:
    config["github"]["appInstallation"]["auth"][0]["readOnly"] = True
    return config


def with_clients(config: dict[str, Any]) -> dict[str, Any]:
    clients = [{"name": name, "token": token, "repos": [r"github\.com/acme/.*"]}
               for name, token in (("a", CLIENT_A), ("b", CLIENT_B))]  # fmt: skip
    config["access"] = {"clients": clients}
    return config


def assert_no_storage_secret_logged(caplog: pytest.LogCaptureFixture, storage: FakeLfs) -> None:
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert not [s for s in storage.secrets if s in logged]
    assert "X-Signature" not in logged


async def lfs_git(git: Git, proxy: str, tmp_path: Path) -> Path:
    await git("lfs", "install", "--skip-repo")
    worktree = tmp_path / "work" / "pushing"
    await git("clone", "--quiet", f"{proxy}/github.com/{REPO}.git", str(worktree))
    await git("lfs", "track", "*.bin", cwd=worktree)
    return worktree


async def commit_object(git: Git, worktree: Path, data: bytes) -> str:
    (worktree / "big.bin").write_bytes(data)
    await git("add", ".gitattributes", "big.bin", cwd=worktree)
    await git("commit", "--quiet", "-m", "add an LFS object", cwd=worktree)
    return hashlib.sha256(data).hexdigest()


async def batch(
    proxy: str, operation: str, oid: str, size: int, token: str | None = None
) -> tuple[int, dict[str, Any], str]:
    body = {"operation": operation, "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]}
    async with aiohttp.ClientSession() as session, session.post(
        f"{proxy}/github.com/{REPO}.git/info/lfs/objects/batch", json=body,
        headers={"Accept": "application/vnd.git-lfs+json", **basic(token)},
    ) as response:  # fmt: skip
        text = await response.text()
        return response.status, json.loads(text) if response.status == 200 else {}, text


def basic(token: str | None) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth("x", token)} if token else {}


def href_of(answer: dict[str, Any], action: str = "download") -> str:
    href: str = answer["objects"][0]["actions"][action]["href"]
    return href


async def test_push_and_clone_carry_the_object_through_the_proxy(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, git: Git, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    worktree = await lfs_git(git, proxy, tmp_path)
    data = os.urandom(5 * MiB + 123)
    oid = await commit_object(git, worktree, data)
    await git("push", "--quiet", "origin", "main", cwd=worktree)
    assert lfs.object_path(oid).read_bytes() == data  # landed on the storage host, checked there too
    assert ("PUT", oid) in lfs.storage_requests and ("VERIFY", oid) in lfs.storage_requests

    fresh = tmp_path / "work" / "fresh"
    await git("clone", "--quiet", f"{proxy}/github.com/{REPO}.git", str(fresh))
    assert (fresh / "big.bin").read_bytes() == data  # smudged back through the proxy
    assert ("GET", oid) in lfs.storage_requests

    status, answer, text = await batch(proxy, "download", oid, len(data))
    assert status == 200
    assert href_of(answer).startswith(f"{proxy}/_lfs/")
    assert "header" not in answer["objects"][0]["actions"]["download"]
    assert lfs.href_host not in text and lfs.remote_auth not in text and "RemoteAuth" not in text
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "git_token_proxy.audit"]
    objects = [line for line in audit if line.get("oid") == oid]
    assert {line["lfs_action"] for line in objects} >= {"upload", "verify", "download"}
    assert all(line["size"] == len(data) for line in objects)
    assert_no_storage_secret_logged(caplog, lfs)


async def test_a_read_only_entry_cannot_push_lfs_objects(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(read_only(lfs_config(fake_github, lfs)))
    worktree = await lfs_git(git, proxy, tmp_path)
    oid = await commit_object(git, worktree, os.urandom(2 * MiB))
    result = await git("push", "origin", "main", cwd=worktree, check=False)
    assert result.returncode != 0
    assert "read-only" in result.stderr
    status, _, text = await batch(proxy, "upload", oid, 2 * MiB)
    assert status == 403 and "read-only" in text
    assert lfs.storage_requests == [] and not lfs.has(oid)


async def test_an_expired_handle_is_refused(fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy) -> None:
    oid = lfs.add_object(b"expired soon\n")
    lfs.expires_at = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    _, answer, _ = await batch(proxy, "download", oid, 13)
    async with aiohttp.ClientSession() as session, session.get(href_of(answer)) as response:
        assert response.status == 404
        assert "expired" in await response.text()
    assert lfs.storage_requests == []


async def test_another_clients_handle_is_refused(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy
) -> None:
    oid = lfs.add_object(b"for client a only\n")
    proxy = await start_proxy(with_clients(lfs_config(fake_github, lfs)))
    _, answer, _ = await batch(proxy, "download", oid, 18, token=CLIENT_A)
    href = href_of(answer)
    async with aiohttp.ClientSession() as session:
        async with session.get(href, headers=basic(CLIENT_B)) as response:
            assert response.status == 404
            assert "another client" in await response.text()
        async with session.get(href) as response:
            assert response.status == 401  # access control applies to /_lfs/ too
        async with session.get(href, headers=basic(CLIENT_A)) as response:
            assert response.status == 200
            assert await response.read() == b"for client a only\n"
    assert lfs.storage_requests == [("GET", oid)]


async def test_a_corrupted_object_is_aborted_not_delivered(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy
) -> None:
    data = os.urandom(3 * MiB)
    oid = lfs.add_object(data)
    lfs.corrupt.add(oid)
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    _, answer, _ = await batch(proxy, "download", oid, len(data))
    received = 0
    async with aiohttp.ClientSession() as session, session.get(href_of(answer)) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += len(chunk)
    assert received < len(data)
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/metrics") as response:
        assert "git_token_proxy_lfs_digest_mismatches_total 1.0" in await response.text()


def write_large_object(storage: FakeLfs, size: int) -> str:
    block, digest = os.urandom(MiB), hashlib.sha256()
    partial = storage.root / "large.partial"
    with partial.open("wb") as sink:
        for index in range(size // MiB):
            chunk = index.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            sink.write(chunk)
    oid = digest.hexdigest()
    partial.rename(storage.object_path(oid))
    return oid


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class PeakRss:
    peak: int = 0


@contextmanager
def sampled_rss() -> Iterator[PeakRss]:
    """The process's resident memory, sampled in a thread while the transfer runs (proxy and fake are both here)."""
    result, stop = PeakRss(resident_bytes()), threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            result.peak = max(result.peak, resident_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


async def test_memory_stays_flat_over_a_200_mib_object(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, tmp_path: Path
) -> None:
    size = 200 * MiB
    oid = await asyncio.to_thread(write_large_object, lfs, size)
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    _, answer, _ = await batch(proxy, "download", oid, size)
    out = tmp_path / "downloaded"
    baseline = resident_bytes()
    with sampled_rss() as rss:  # curl is another process: only the proxy's (and the fake's) memory is measured
        curl = await asyncio.create_subprocess_exec("curl", "-sSf", "-o", str(out), href_of(answer))
        assert await curl.wait() == 0
    assert out.stat().st_size == size
    assert await asyncio.to_thread(lambda: hashlib.sha256(out.read_bytes()).hexdigest()) == oid
    assert rss.peak - baseline < 40 * MiB, f"resident memory grew by {(rss.peak - baseline) // MiB} MiB"


async def test_actions_on_other_hosts_pass_untouched_and_off_means_off(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy
) -> None:
    oid = lfs.add_object(b"elsewhere\n")
    other = lfs_config(fake_github, lfs)
    other["lfs"]["storageHosts"] = [{"host": "another-storage.invalid", "url": lfs.storage_url}]
    proxy = await start_proxy(other)
    _, answer, _ = await batch(proxy, "download", oid, 10)
    assert re.match(rf"https://{re.escape(lfs.href_host)}/", href_of(answer))
    proxy_off = await start_proxy(static_config(fake_github.url))
    _, answer, _ = await batch(proxy_off, "download", oid, 10)
    assert href_of(answer).startswith(f"https://{lfs.href_host}/")
    async with aiohttp.ClientSession() as session, session.get(f"{proxy_off}/_lfs/anything") as response:
        assert response.status == 404
