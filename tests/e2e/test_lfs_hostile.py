"""The LFS object path against a hostile local process and a hostile LFS server (found by a red team; each test
failed before its fix)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import PROXY, create_app
from proxy.config import parse_config
from proxy.errors import UpstreamBadResponse
from proxy.lfs import HandleStore, LfsPolicy, rewrite_batch_answer
from proxy.lfs.batch import _ttl
from proxy.testing import FakeGitHub
from proxy.testing.fake_lfs import FakeLfs
from tests.e2e.test_lfs import batch, href_of, lfs_config, read_only
from tests.support import StartProxy


# ---------------------------------------------------------------- F1: reload making the ENTRY read-only
async def test_F1_reload_making_entry_read_only_stops_issued_upload_handles(
    fake_github: FakeGitHub, lfs: FakeLfs
) -> None:
    """README: 'a reload that makes a client or entry read-only stops its uploads'. The handle keeps the batch
    request's Route, whose `entry` is the old AuthEntry object, so _refuse_lfs_write checks stale config."""
    config = lfs_config(fake_github, lfs)
    app = await create_app(parse_config(config))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    proxy = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        data = os.urandom(1000)
        import hashlib

        oid = hashlib.sha256(data).hexdigest()
        status, answer, _ = await batch(proxy, "upload", oid, len(data))
        assert status == 200
        upload = href_of(answer, "upload")
        await app[PROXY].reload(parse_config(read_only(lfs_config(fake_github, lfs))))
        async with aiohttp.ClientSession() as session, session.put(upload, data=data) as response:
            status = response.status
        assert status == 403, f"upload after reload to readOnly entry got {status}"
        assert not lfs.has(oid), "object reached storage through a read-only entry"
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- F2: hostile batch API -> 500 + traceback
def test_F2_a_huge_expires_in_is_clamped_not_a_crash() -> None:
    assert _ttl({"expires_in": 10**400}) <= 3600  # json.loads gives an int; float() of it raised OverflowError
    with pytest.raises(UpstreamBadResponse):
        _ttl({"expires_at": "9999-12-31T23:59:59+00:00" + "0" * 3})


async def test_F2b_a_huge_expires_in_through_http_is_never_a_500(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    oid = lfs.add_object(b"x\n")
    original = lfs._action

    def hostile(*args: Any, **kwargs: Any) -> dict[str, object]:
        action = original(*args, **kwargs)
        action["expires_in"] = 10**400
        return action

    lfs._action = hostile  # type: ignore[method-assign]
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    status, _, text = await batch(proxy, "download", oid, 2)
    assert "Traceback" not in caplog.text
    assert status == 200, f"got {status}: {text!r}"  # clamped to the proxy's own cap, like any expiry


# ---------------------------------------------------------------- F3: CR/LF or non-latin-1 in an action header
@pytest.mark.parametrize("value", ["RemoteAuth abc\r\nX-Injected: 1", "RemoteAuth abc\n"])  # `$` matched before \n
async def test_F3_bad_action_header_is_refused_not_a_500(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    oid = lfs.add_object(b"hello\n")
    original = lfs._action

    def hostile(*args: Any, **kwargs: Any) -> dict[str, object]:
        action = original(*args, **kwargs)
        action["header"] = {"Authorization": value}
        return action

    lfs._action = hostile  # type: ignore[method-assign]
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    status, answer, _text = await batch(proxy, "download", oid, 6)
    if status == 200:
        async with aiohttp.ClientSession() as session, session.get(href_of(answer)) as response:
            status = response.status
    assert status != 500, "hostile storage header -> internal error with a traceback in the log"
    assert "Traceback" not in caplog.text


# ---------------------------------------------------------------- F4: handle memory is bounded by count only
def test_F4_a_handle_does_not_keep_a_megabyte_href() -> None:
    """MAX_HANDLES = 200_000 'few hundred bytes' each; a batch answer may carry a ~1 MiB href, kept per handle:
    200k x 1 MiB. The store should cap href/header size (or hold a byte budget)."""
    from proxy.config import StorageHostConfig  # noqa: F401

    policy = LfsPolicy.from_config(
        parse_config(
            {
                **_minimal(),
                "lfs": {"proxyObjects": True, "storageHosts": [{"host": "s.example", "url": "http://127.0.0.1:9"}]},
            }
        ).lfs
    )
    assert policy is not None
    href = "https://s.example/o?" + "A" * 1_000_000
    body = json.dumps({"objects": [{"oid": "a" * 64, "size": 1, "actions": {"download": {"href": href}}}]}).encode()
    store = HandleStore()
    with pytest.raises(UpstreamBadResponse):
        rewrite_batch_answer(body, policy, store, None, None, "http://127.0.0.1:1")  # type: ignore[arg-type]


def _minimal() -> dict[str, Any]:
    from tests.support import static_config

    return static_config("http://127.0.0.1:9")


# ---------------------------------------------------------------- F5: the same host, spelled differently
@pytest.mark.parametrize("host", ["lfs-storage.invalid.", "lfs-storage.invalid%2E"])
async def test_F5_storage_credential_never_reaches_the_client(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, host: str
) -> None:
    """A href naming the configured storage host with a trailing dot (same DNS name) is 'another host': passed on
    untouched, `header` (RemoteAuth) and signature included. README: 'The sandbox never sees a storage credential'."""
    oid = lfs.add_object(b"dot\n")
    config = lfs_config(fake_github, lfs)
    lfs.href_host = host
    proxy = await start_proxy(config)
    status, _answer, text = await batch(proxy, "download", oid, 4)
    assert status == 200
    assert lfs.remote_auth not in text, "storage credential handed to the client"


# ---------------------------------------------------------------- round 4, item 2: framing headers from an answer
class RecordingStorage:
    """A raw storage host that keeps every request head and body as they arrived, framing bodies by Content-Length
    only, and keeps connections open: a smuggled request, or a body longer than its Content-Length, shows up as a
    request of its own or as bytes left over."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.content_type: str | None = None
        self.requests: list[tuple[list[str], bytes]] = []  # (lower-cased head lines, body)
        self.leftover = b""
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffered = b""
        with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                    if not chunk:
                        raise ConnectionError
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                lines = [line.lower() for line in head.decode("latin-1").split("\r\n")]
                length = next((int(line.split(":", 1)[1]) for line in lines if line.startswith("content-length:")), 0)
                while len(buffered) < length:
                    buffered += await asyncio.wait_for(reader.read(65536), 1.0)
                self.requests.append((lines, buffered[:length]))
                buffered = buffered[length:]
                body = self.body if lines[0].startswith("get ") else b""
                typed = f"Content-Type: {self.content_type}\r\n".encode() if self.content_type else b""
                writer.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (typed, len(body), body))
        self.leftover += buffered
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


HOSTILE_ACTION_HEADERS = {
    "Transfer-Encoding": "chunked", "Content-Length": "5", "Host": "evil.example", "Connection": "Upgrade",
    "Upgrade": "h2c", "Expect": "100-continue", "TE": "trailers", "Trailer": "X-Amz-Date", "Keep-Alive": "300",
    "Proxy-Authorization": "Basic eDp5", "X-Evil": "1",
    "X-Amz-Date": "20261202T000000Z", "x-ms-blob-type": "BlockBlob",  # signed headers storage needs: kept
}  # fmt: skip


async def test_framing_headers_in_a_batch_answer_never_reach_the_storage_host(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile batch API tries to smuggle a second request onto the storage host (Transfer-Encoding beside the
    proxy's Content-Length, Host, Connection: Upgrade...). The storage host receives one request per exchange,
    framed by the proxy alone, with the action's credential and signed headers and nothing else."""
    caplog.set_level(logging.INFO)
    data = os.urandom(3000)
    oid = lfs.add_object(data)  # for the download; the upload goes to the recording host under another oid
    upload_data = os.urandom(2000)
    upload_oid = hashlib.sha256(upload_data).hexdigest()
    storage = RecordingStorage(data)
    storage_url = await storage.start()
    lfs.action_headers = dict(HOSTILE_ACTION_HEADERS)
    config = lfs_config(fake_github, lfs)
    config["lfs"]["storageHosts"][0]["url"] = storage_url
    proxy = await start_proxy(config)
    try:
        status, answer, _ = await batch(proxy, "upload", upload_oid, len(upload_data))
        assert status == 200 and "header" not in answer["objects"][0]["actions"]["upload"]
        async with aiohttp.ClientSession() as session:
            async with session.put(href_of(answer, "upload"), data=upload_data) as put:
                assert put.status == 200
            status, answer, _ = await batch(proxy, "download", oid, len(data))
            async with session.get(href_of(answer)) as got:
                assert got.status == 200 and await got.read() == data
        await asyncio.sleep(1.2)  # the recorder keeps each connection open: anything smuggled would arrive
    finally:
        await storage.close()
    heads = storage.requests
    assert [lines[0].split(" ")[0] for lines, _ in heads] == ["put", "get"]
    assert storage.leftover == b"", "bytes past the last request: a smuggled request in the making"
    host = storage_url.removeprefix("http://")
    for (lines, rest), expected in zip(heads, (upload_data, b""), strict=True):
        names = [line.split(":", 1)[0] for line in lines[1:]]
        assert len(names) == len(set(names)), f"a header twice: {names}"
        for framing in ("transfer-encoding", "connection", "upgrade", "expect", "te", "trailer", "keep-alive",
                        "proxy-authorization", "x-evil"):  # fmt: skip
            assert framing not in names
        assert f"host: {host}" in lines
        assert f"authorization: remoteauth {lfs.remote_auth.lower()}" in lines
        assert "x-amz-date: 20261202t000000z" in lines and "x-ms-blob-type: blockblob" in lines
        assert rest == expected
    assert f"content-length: {len(upload_data)}" in heads[0][0]
    assert "content-length: 5" not in heads[0][0] + heads[1][0]
    samples = await scrape_dropped(proxy)
    # Three actions (upload, verify, download), each losing every hostile header but the two signed ones.
    assert samples == 3 * (len(HOSTILE_ACTION_HEADERS) - 2)
    assert any("'transfer-encoding' is not sent to storage" in r.getMessage() for r in caplog.records)


async def scrape_dropped(proxy: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/metrics") as response:
        text = await response.text()
    [line] = [line for line in text.splitlines() if line.startswith("git_token_proxy_lfs_action_headers_dropped_total")]
    return float(line.split()[-1])


async def test_an_action_header_named_twice_is_refused(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy
) -> None:
    oid = lfs.add_object(b"twice\n")
    lfs.action_headers = {"authorization": "RemoteAuth another"}  # besides the fake's own Authorization
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    status, _, text = await batch(proxy, "download", oid, 6)
    assert status == 502 and "an action header named twice" in text


async def test_a_storage_content_type_with_a_control_character_is_a_502_not_a_500(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 4, item 9: the git path checked upstream's headers for control characters, the LFS object path did
    not, and aiohttp then refused to write the header: a 500 with a traceback."""
    data = b"typed\n"
    oid = lfs.add_object(data)
    storage = RecordingStorage(data)
    storage_url = await storage.start()
    config = lfs_config(fake_github, lfs)
    config["lfs"]["storageHosts"][0]["url"] = storage_url
    lfs.action_headers = {}
    proxy = await start_proxy(config)
    try:
        for bad in ("\x01", "\x7f"):
            storage.body = data
            storage.content_type = f"application/octet-stream{bad}"
            _, answer, _ = await batch(proxy, "download", oid, len(data))
            async with aiohttp.ClientSession() as session, session.get(href_of(answer)) as got:
                assert got.status == 502 and "control character" in await got.text()
    finally:
        await storage.close()
    assert "Traceback" not in caplog.text


async def test_an_action_header_name_ending_in_a_newline_is_refused_with_the_answer(
    fake_github: FakeGitHub, lfs: FakeLfs, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    oid = lfs.add_object(b"newline\n")
    lfs.action_headers = {"x-amz-meta\n": "v"}
    proxy = await start_proxy(lfs_config(fake_github, lfs))
    status, _, text = await batch(proxy, "download", oid, 8)
    assert status == 502 and "characters no header may hold" in text
    assert "Traceback" not in caplog.text
