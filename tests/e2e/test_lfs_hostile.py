"""The LFS object path against a hostile local process and a hostile LFS server (found by a red team; each test
failed before its fix)."""

from __future__ import annotations

import json
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
from tests.conftest import StartProxy
from tests.e2e.test_lfs import batch, href_of, lfs_config, read_only


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
@pytest.mark.parametrize("value", ["RemoteAuth abc\r\nX-Injected: 1"])
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
    from tests.conftest import static_config

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
