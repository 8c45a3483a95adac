"""The mirror cache against a hostile local process (found by a red team; each test failed before its fix).

A mirror holds objects for anyone: what must hold is that a pack leaves it only for a credential upstream lets read
that very repo, that no request can make the proxy stall or hold processes, and that none costs upstream much more
than a pass-through would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import subprocess
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.testing import FakeGitHub
from tests.e2e.nested_upstream import NestedUpstream, static_entry, v2_fetch
from tests.support import PRIVATE_FILES, STATIC_TOKEN, Git, StartProxy, UpstreamApp, static_config
from tests.test_forward import config_for

TOKEN_A, TOKEN_B = "token-team-a-1111", "token-team-b-2222"
H = {"Git-Protocol": "version=2", "Content-Type": "application/x-git-upload-pack-request"}


def mirror_config(fake: FakeGitHub, directory: Path, server: dict[str, str] | None = None) -> dict[str, object]:
    config = static_config(fake.url)
    config["mirror"] = {"dir": str(directory)}
    if server:
        config["server"] = server
    return config


def setup_repo(fake: FakeGitHub, big: bool = False, blobs: int = 8) -> None:
    files = dict(PRIVATE_FILES)
    if big:
        files.update({f"b{i}.bin": os.urandom(1 << 20) for i in range(blobs)})
    fake.create_repo("acme/private", files)
    fake.add_token(STATIC_TOKEN, repos=["acme/private"])


def mirror_upload_packs(mirror_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "upload-pack" in line and str(mirror_dir) in line]


# F1: the mirror key once dropped the baseUrl path, so two entries' repos shared one mirror.
async def test_another_entrys_credential_gets_no_pack_from_a_shared_looking_mirror(
    tmp_path: Path, start_proxy: StartProxy, git: Git
) -> None:
    upstream = NestedUpstream(tmp_path / "up")
    (tmp_path / "up").mkdir()
    await upstream.start()
    try:
        secret = upstream.create("team-a/acme/app", {"secret.txt": b"TEAM A SECRET\n"}, {TOKEN_A})
        upstream.create("team-b/acme/app", {"readme.txt": b"team b\n"}, {TOKEN_B})
        config = {
            "upstreams": [{"host": "git.company.local", "url": upstream.url, "anonymous": False}],
            "github": {"appInstallation": {"auth": [
                static_entry("team-a", r"(?<baseUrl>git\.company\.local/team-a)/.*", TOKEN_A),
                static_entry("team-b", r"(?<baseUrl>git\.company\.local/team-b)/.*", TOKEN_B),
            ]}},
            "mirror": {"dir": str(tmp_path / "mirror")},
        }  # fmt: skip
        proxy = await start_proxy(config)
        await git("clone", "--quiet", f"{proxy}/git.company.local/team-a/acme/app", "victim")
        await git("init", "--quiet", "attacker")
        attacker = git.workdir / "attacker"
        await git("fetch", f"{proxy}/git.company.local/team-b/acme/app", secret, cwd=attacker, check=False)
        shown = await git("cat-file", "-p", f"{secret}:secret.txt", cwd=attacker, check=False)
    finally:
        await upstream.close()
    assert "TEAM A SECRET" not in shown.stdout, "team-b fetched team-a's commit from the mirror"


# F2: a 64 KiB gzip body of flush packets once froze the event loop for seconds while it was parsed.
async def test_a_small_gzip_bomb_does_not_block_the_event_loop(
    fake_github: FakeGitHub, start_proxy: StartProxy, tmp_path: Path
) -> None:
    setup_repo(fake_github)
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "m"))
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = packer.compress(b"0000" * (4 * 1024 * 1024 - 64)) + packer.flush()
    assert len(bomb) < 70_000
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/x-git-upload-pack-request"}

    def post() -> None:  # in threads: the proxy runs on this test's own loop
        request = urllib.request.Request(
            f"{proxy}/github.com/acme/private.git/git-upload-pack", data=bomb, method="POST", headers=headers
        )
        with contextlib.suppress(Exception):
            urllib.request.urlopen(request, timeout=60).read()

    def probe() -> float:
        started = time.monotonic()
        with contextlib.suppress(Exception):
            urllib.request.urlopen(f"{proxy}/healthz", timeout=60).read()
        return time.monotonic() - started

    loop = asyncio.get_running_loop()
    posting = loop.run_in_executor(None, post)
    latencies = []
    for _ in range(8):
        latencies.append(await loop.run_in_executor(None, probe))
        await asyncio.sleep(0.1)
    await posting
    assert max(latencies) < 2.0, f"an unrelated request waited {max(latencies):.1f} s: the event loop was blocked"


# F3: the transfer watch once took a mirror fill (no bytes either way) for a client that stopped sending.
async def test_a_cold_clone_is_not_cut_by_write_timeout_while_the_mirror_fills(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    setup_repo(fake_github, big=True)
    fake_github.git_bytes_per_second = 2 * 1024 * 1024  # a fill of about 4 s
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "m", {"writeTimeout": "1s"}))
    cloned = await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "cold", check=False)
    assert cloned.returncode == 0, cloned.stderr


# F4: a client that stopped reading a mirror answer once held upload-pack (and the repo's reader count) for good.
async def test_a_client_that_stops_reading_a_mirror_answer_is_cut(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    setup_repo(fake_github, big=True, blobs=48)
    mirror_dir = tmp_path / "m"
    warm = await start_proxy(mirror_config(fake_github, mirror_dir))
    await git("clone", "--quiet", f"{warm}/github.com/acme/private", "warm")
    proxy = await start_proxy(mirror_config(fake_github, mirror_dir, {"writeTimeout": "1s"}))
    refs = f"{proxy}/github.com/acme/private.git/info/refs?service=git-upload-pack"
    async with aiohttp.ClientSession() as session, session.get(refs) as answer:  # the proof, as git's first request
        assert answer.status == 200
    head = (await git("rev-parse", "HEAD", cwd=git.workdir / "warm")).stdout.strip()
    body = v2_fetch(head)
    request = (
        b"POST /github.com/acme/private.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Git-Protocol: version=2\r\nContent-Type: application/x-git-upload-pack-request\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    connections = []
    for _ in range(3):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(proxy.rsplit(":", 1)[1])))
        sock.sendall(request)
        connections.append(sock)
    await asyncio.sleep(1.0)
    for sock in connections:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.recv(100)  # the status line, and then nothing more
    await asyncio.sleep(5.0)  # five times writeTimeout
    alive = mirror_upload_packs(mirror_dir)
    for sock in connections:
        sock.close()
    assert not alive, f"{len(alive)} upload-pack processes held by clients that stopped reading"


# F5: a pack request with an unknown want once cost about 5 upstream git requests.
async def test_unknown_wants_do_not_amplify_upstream_requests(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    setup_repo(fake_github)
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "m"))
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "warm")
    before, count = len(fake_github.git_requests), 5
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            url = f"{proxy}/github.com/acme/private.git/git-upload-pack"
            async with session.post(url, data=v2_fetch(f"{i:040x}"), headers=H) as answer:
                await answer.read()
    per_request = (len(fake_github.git_requests) - before) / count
    assert per_request <= 2, f"{per_request} upstream requests per client pack request"


# F6: one malformed request must not send the repo to fsck (which every reader then waits for)
async def test_a_malformed_filter_does_not_send_the_mirror_to_fsck(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    setup_repo(fake_github)
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "m"))
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "warm")
    head = (await git("rev-parse", "HEAD", cwd=git.workdir / "warm")).stdout.strip()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy}/github.com/acme/private.git/git-upload-pack",
            data=v2_fetch(head, extra=["filter bogus:spec"]),
            headers=H,
        ) as answer,
    ):
        await answer.read()
    await asyncio.sleep(1)
    assert not [r for r in caplog.records if "checking it (fsck)" in r.getMessage()]


# Round 4, item 5: the mirror served a commit upstream had purged (force-pushed away, reflog expired, gc'd).
@pytest.mark.parametrize("version", ["2", "0"])
async def test_a_commit_upstream_purged_is_never_served_from_the_mirror(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path, version: str
) -> None:
    setup_repo(fake_github)
    base = fake_github.head("acme/private")
    secret = fake_github.commit("acme/private", "secret.txt", b"AKIA... pushed by mistake\n")
    proxy = await start_proxy(mirror_config(fake_github, tmp_path / "m"))
    url = f"{proxy}/github.com/acme/private"
    await git("clone", "--quiet", url, "before")  # the mirror now holds the secret commit
    fake_github.purge("acme/private", "main", base)

    await git("init", "--quiet", "probe")
    probe = git.workdir / "probe"
    fetched = await git("-c", f"protocol.version={version}", "fetch", url, secret, cwd=probe, check=False)
    assert fetched.returncode != 0, "the mirror served a commit upstream no longer has"
    assert (await git("cat-file", "-e", secret, cwd=probe, check=False)).returncode != 0
    await git("-c", f"protocol.version={version}", "clone", "--quiet", url, "after")  # and clones still work
    assert (await git("rev-parse", "HEAD", cwd=git.workdir / "after")).stdout.strip() == base


def mirror_in_front_of(upstream_url: str, directory: Path, **mirror: object) -> dict[str, object]:
    config = config_for(upstream_url)
    config["mirror"] = {"dir": str(directory), **mirror}
    return config


# Round 4, item 6: the authorization probe read upstream's whole info/refs answer into memory.
async def test_the_authorization_probe_reads_no_more_than_it_needs(
    start_proxy: StartProxy, upstream_app: UpstreamApp, tmp_path: Path
) -> None:
    sent = {"info/refs": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/info/refs") and "User-Agent" in request.headers:
            return web.Response(status=500)  # the mirror's own `git fetch`: git's memory, not the proxy's
        if request.path.endswith("/info/refs"):
            response = web.StreamResponse(headers={"Content-Type": "application/x-git-upload-pack-advertisement"})
            await response.prepare(request)
            chunk = b"0" * (1 << 20)
            with contextlib.suppress(ConnectionError):
                for _ in range(256):  # 256 MiB, if anyone reads it
                    await response.write(chunk)
                    sent["info/refs"] += len(chunk)
            return response
        await request.read()
        return web.Response(status=200, content_type="application/x-git-upload-pack-result")

    proxy = await start_proxy(mirror_in_front_of(await upstream_app(handler), tmp_path / "m"))
    async with aiohttp.ClientSession() as session:
        url = f"{proxy}/github.com/acme/private.git/git-upload-pack"
        async with session.post(url, data=v2_fetch("a" * 40), headers=H) as answer:
            assert answer.status == 200  # the bypass: upstream's own answer
    assert sent["info/refs"] < 32 << 20, f"the probe read {sent['info/refs'] >> 20} MiB of a ref advertisement"


# Round 4, item 7: with the mirror on, pack requests were held whole: over 16 MiB refused, and no bound across them.
async def test_a_chunked_pack_request_over_the_mirrors_limit_goes_upstream_whole(
    start_proxy: StartProxy, upstream_app: UpstreamApp, tmp_path: Path
) -> None:
    received: list[tuple[int, str]] = []

    async def handler(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        received.append((size, digest.hexdigest()))
        return web.Response(status=200, content_type="application/x-git-upload-pack-result")

    proxy = await start_proxy(mirror_in_front_of(await upstream_app(handler), tmp_path / "m"))
    head = v2_fetch("b" * 40)[:-4]  # a fetch without its flush: then 17 MiB of haves-like padding lines
    line = b"0032have " + b"c" * 40 + b"\n"
    body = head + line * ((17 << 20) // len(line)) + b"0000"

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    async with aiohttp.ClientSession() as session:
        url = f"{proxy}/github.com/acme/private.git/git-upload-pack"
        async with session.post(url, data=chunked(), headers=H) as answer:
            assert answer.status == 200
    assert received == [(len(body), hashlib.sha256(body).hexdigest())]  # exactly the bytes the client sent


async def test_pack_requests_together_hold_no_more_than_max_held_bodies(
    start_proxy: StartProxy, upstream_app: UpstreamApp, tmp_path: Path
) -> None:
    """Three pack requests of 12 MiB, 1 MiB of each sent, the rest pending: with mirror.maxHeldBodies at 2.5 MiB the
    proxy holds the first two's megabyte and passes the third on as it comes (upstream sees it start), instead of
    holding all three. The budget counts bytes that arrived, not what a Content-Length promises. All complete."""
    started: list[int] = []
    finished: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        started.append(request.content_length or 0)
        finished.append(sum([len(chunk) async for chunk in request.content.iter_any()]))
        return web.Response(status=200, content_type="application/x-git-upload-pack-result")

    config = mirror_in_front_of(await upstream_app(handler), tmp_path / "m", maxHeldBodies="2560KiB")
    proxy = await start_proxy(config)
    size = 12 << 20
    port = int(proxy.rsplit(":", 1)[1])
    connections = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /github.com/acme/private.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-git-upload-pack-request\r\nGit-Protocol: version=2\r\n"
                     b"Content-Length: %d\r\n\r\n" % size + b"0" * (1 << 20))  # fmt: skip
        await writer.drain()
        connections.append((reader, writer))
    for _ in range(100):
        if started:
            break
        await asyncio.sleep(0.05)
    assert started == [size], "the third body was held too (or the first two were passed on)"
    for _, writer in connections:
        writer.write(b"0" * (size - (1 << 20)))
        await writer.drain()
    for reader, writer in connections:
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)).startswith(b"HTTP/1.1 200")
        writer.close()
    assert sorted(finished) == [size, size, size]


async def test_bodies_that_promise_much_and_send_little_do_not_switch_the_mirror_off(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    """Red team, round 4: four connections declaring 16 MiB and dripping took the whole budget for hours, and every
    other pack request bypassed the mirror. The budget now counts what arrived: a clone meanwhile is served."""
    setup_repo(fake_github)
    config = mirror_config(fake_github, tmp_path / "m")
    config["mirror"]["maxHeldBodies"] = "32MiB"
    proxy = await start_proxy(config)
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "warm")
    port = int(proxy.rsplit(":", 1)[1])
    writers = []
    for _ in range(4):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /github.com/acme/private.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-git-upload-pack-request\r\nGit-Protocol: version=2\r\n"
                     b"Content-Length: 16000000\r\n\r\n0014command=fetch\n")  # fmt: skip
        await writer.drain()
        writers.append(writer)
    try:
        await asyncio.sleep(0.3)
        before = await _mirror_hits(proxy)
        await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "meanwhile")
        assert await _mirror_hits(proxy) == before + 1, "the clone's pack came from upstream: the mirror was off"
    finally:
        for writer in writers:
            writer.close()


async def _mirror_hits(proxy: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/metrics") as response:
        text = await response.text()
    found = re.search(r'git_token_proxy_mirror_requests_total\{outcome="hit"\} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0
