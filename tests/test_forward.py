"""Forward: headers, refusals, redirects, upstream failures and disconnects, seen from raw HTTP on both sides."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.testing import FakeGitHub, git_env, run_git
from tests.support import STATIC_TOKEN, StartProxy, TrapServer, UpstreamApp, static_config

INFO_REFS = "/github.com/acme/private.git/info/refs?service=git-upload-pack"


async def raw_request(base: str, target: str, method: str = "GET", headers: dict[str, str] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """HTTP/1.1 with the request target sent exactly as given: no client library normalises it first."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    headers = {"Host": f"{host}:{port}", **(headers or {})}
    lines = [f"{method} {target} HTTP/1.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in parsed.items()}, payload


def config_for(upstream_url: str, **upstream: Any) -> dict[str, Any]:
    return static_config(upstream_url, upstreams=[{"host": "github.com", "url": upstream_url, **upstream}])


async def test_headers_are_filtered_and_credentials_replaced(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    status, _, body = await raw_request(
        proxy,
        INFO_REFS,
        headers={
            "Authorization": "Basic ZXZpbDpldmls",
            "Cookie": "session=stolen",
            "Git-Protocol": "version=2",
            "User-Agent": "git/2.39.5",
            "Accept": "*/*",
            "Accept-Encoding": "deflate, gzip",
            "Connection": "close, X-Hop-Header",
            "X-Hop-Header": "must not pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic cHJveHk6cHJveHk=",
            "TE": "trailers",
            "Upgrade": "h2c",
        },
    )
    assert status == 200, body
    (seen,) = fake_github.seen
    assert seen.token == STATIC_TOKEN and seen.username == "x-access-token"
    sent = {name.lower(): value for name, value in seen.headers.items()}
    for dropped in ("cookie", "x-hop-header", "keep-alive", "proxy-authorization", "te", "upgrade"):
        assert dropped not in sent
    assert sent["git-protocol"] == "version=2"
    assert sent["user-agent"] == "git/2.39.5"
    assert sent["accept-encoding"] == "deflate, gzip"
    assert sent["host"] == fake_github.url.removeprefix("http://")


async def test_bodies_pass_through_compressed_both_ways(start_proxy: StartProxy, upstream_app: UpstreamApp) -> None:
    received: list[tuple[str | None, bytes]] = []
    answer = gzip.compress(b"0008NAK\n" * 500)

    async def handler(request: web.Request) -> web.StreamResponse:
        received.append((request.headers.get("Content-Encoding"), await request.read()))
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/x-git-upload-pack-result"}
        return web.Response(body=answer, headers=headers)

    proxy = await start_proxy(config_for(await upstream_app(handler)))
    request_body = gzip.compress(b"0032want " + b"a" * 40 + b"\n" * 100)
    status, headers, body = await raw_request(
        proxy,
        "/github.com/acme/private.git/git-upload-pack",
        "POST",
        {"Content-Encoding": "gzip", "Content-Type": "application/x-git-upload-pack-request"},
        request_body,
    )
    assert status == 200
    assert received == [("gzip", request_body)]
    assert headers["content-encoding"] == "gzip"
    assert headers["content-type"] == "application/x-git-upload-pack-result"
    assert body == answer  # still compressed: the proxy did not inflate it


NON_GIT_TARGETS = [
    "/github.com/acme/private.git/HEAD",
    "/github.com/acme/private.git/objects/info/packs",
    "/github.com/acme/private.git/info/refs",
    "/github.com/repos/acme/private/contents/README.md",
    "/github.com/user",
    "/github.com/acme/private.git/info/refs?service=git-upload-archive",
    "/github.com/acme/../private.git/info/refs?service=git-upload-pack",
    "/github.com/acme/%2e%2e/info/refs?service=git-upload-pack",
    "/github.com@evil.example/acme/x/info/refs?service=git-upload-pack",
    "//evil.example/acme/x/info/refs?service=git-upload-pack",
    "/github.com%3A1/acme/x/info/refs?service=git-upload-pack",
    "http://evil.example/acme/x/info/refs?service=git-upload-pack",
]


async def test_refusals_never_reach_upstream(start_proxy: StartProxy, trap: TrapServer) -> None:
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    foreign = [
        f"/127.0.0.1:{trap.port}/acme/x/info/refs?service=git-upload-pack",
        f"/localhost:{trap.port}/acme/x/info/refs?service=git-upload-pack",
        "/evil.example/acme/x/info/refs?service=git-upload-pack",
    ]
    for target in [*NON_GIT_TARGETS, *foreign]:
        for method in ("GET", "POST"):
            status, headers, body = await raw_request(proxy, target, method)
            assert 400 <= status < 500, (target, status)
            assert headers["content-type"].startswith("text/plain"), target
            assert "www-authenticate" not in headers
            assert body.strip(), target
    assert trap.accepted == 0
    status, _, body = await raw_request(proxy, foreign[0])
    assert status == 403 and b"not an allowed upstream" in body


async def test_upstream_401_without_entry_becomes_403_without_prompt(
    fake_github: FakeGitHub, start_proxy: StartProxy
) -> None:
    fake_github.create_repo("someone/secret", {"x": b"x"})
    proxy = await start_proxy(static_config(fake_github.url))
    status, headers, body = await raw_request(proxy, "/github.com/someone/secret/info/refs?service=git-upload-pack")
    assert status == 403
    assert "www-authenticate" not in headers
    assert b"needs credentials" in body


async def test_rejected_static_token_is_a_502_with_reason(fake_github: FakeGitHub, start_proxy: StartProxy) -> None:
    fake_github.create_repo("acme/private", {"x": b"x"})  # no token registered: the entry's token is refused
    proxy = await start_proxy(static_config(fake_github.url))
    status, headers, body = await raw_request(proxy, INFO_REFS)
    assert status == 502
    assert "www-authenticate" not in headers
    assert b"rejected the credential of auth entry 'acme-bot'" in body


async def test_same_host_redirect_is_rewritten_and_not_followed(
    start_proxy: StartProxy, upstream_app: UpstreamApp
) -> None:
    hits: list[str] = []
    base: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        hits.append(request.path_qs)
        location = f"{base[0]}/acme/renamed.git/info/refs?service=git-upload-pack"
        return web.Response(status=301, headers={"Location": location})

    base.append(await upstream_app(handler))
    proxy = await start_proxy(config_for(base[0]))
    status, headers, _ = await raw_request(proxy, INFO_REFS)
    assert status == 301
    assert headers["location"] == "/github.com/acme/renamed.git/info/refs?service=git-upload-pack"
    assert hits == ["/acme/private.git/info/refs?service=git-upload-pack"]


@pytest.mark.parametrize("location", ["https://evil.example/acme/x.git/info/refs", "//evil.example/x"])
async def test_redirect_off_the_upstream_is_a_502(
    start_proxy: StartProxy, upstream_app: UpstreamApp, location: str
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": location})

    proxy = await start_proxy(config_for(await upstream_app(handler)))
    status, headers, body = await raw_request(proxy, INFO_REFS)
    assert status == 502
    assert "location" not in headers
    assert b"redirected to another host" in body


async def test_connect_error_is_a_502(start_proxy: StartProxy) -> None:
    closed = TrapServer()
    closed.close()
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{closed.port}"))
    status, headers, body = await raw_request(proxy, INFO_REFS)
    assert status == 502
    assert headers["content-type"].startswith("text/plain")
    assert body.startswith(b"cannot connect to github.com")


async def test_silent_upstream_is_a_504(start_proxy: StartProxy, upstream_app: UpstreamApp) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    proxy = await start_proxy(config_for(await upstream_app(handler), readTimeout="300ms"))
    status, _, body = await raw_request(proxy, INFO_REFS)
    assert status == 504
    assert b"did not answer in time" in body


async def test_upstream_breaking_mid_body_aborts_the_client(start_proxy: StartProxy, upstream_app: UpstreamApp) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000000"})
        await response.prepare(request)
        await response.write(os.urandom(10_000))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    proxy = await start_proxy(config_for(await upstream_app(handler)))
    async with aiohttp.ClientSession() as session, session.get(proxy + INFO_REFS) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


def pkt(payload: bytes) -> bytes:
    return f"{len(payload) + 4:04x}".encode() + payload


async def test_a_push_reaches_upstream_once_when_upstream_breaks_after_its_headers(
    start_proxy: StartProxy, upstream_app: UpstreamApp, tmp_path: Path
) -> None:
    """The status line goes out before the body: a connection that dies with nothing of an answer on it is, to
    git's libcurl, a stale keep-alive, and it sends the request again on a new one (a push would land twice)."""
    pushes = 0

    async def receive_pack(request: web.Request) -> web.StreamResponse:
        nonlocal pushes
        await request.read()
        if request.path.endswith("/info/refs"):
            refs = pkt(b"0" * 40 + b" capabilities^{}\0report-status delete-refs ofs-delta\n")
            body = pkt(b"# service=git-receive-pack\n") + b"0000" + refs + b"0000"
            return web.Response(body=body, content_type="application/x-git-receive-pack-advertisement")
        pushes += 1
        response = web.StreamResponse(headers={"Content-Type": "application/x-git-receive-pack-result"})
        await response.prepare(request)
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()
        return response

    proxy = await start_proxy(config_for(await upstream_app(receive_pack)))
    env = git_env(tmp_path / "home")
    work = tmp_path / "work"
    (await run_git("init", "--quiet", str(work), env=env)).check()
    (await run_git("commit", "--quiet", "--allow-empty", "-m", "one", env=env, cwd=work)).check()
    pushed = await run_git("push", f"{proxy}/github.com/acme/private.git", "HEAD:refs/heads/main", env=env, cwd=work)
    assert pushed.returncode != 0  # git sees the failure...
    assert pushes == 1  # ...and upstream the push once


async def test_client_hanging_up_mid_stream_closes_upstream_quietly(
    start_proxy: StartProxy, upstream_app: UpstreamApp, caplog: pytest.LogCaptureFixture
) -> None:
    upstream_gone = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(10_000):
                await response.write(os.urandom(64 * 1024))
                await asyncio.sleep(0.001)
        except (ConnectionError, asyncio.CancelledError):  # aiohttp cancels or fails the write, by version
            upstream_gone.set()
        return response

    proxy = await start_proxy(config_for(await upstream_app(handler)))
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection(*proxy.removeprefix("http://").split(":"))
    writer.write(f"GET {INFO_REFS} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await reader.readexactly(200_000)
    writer.transport.abort()
    writer.close()
    await asyncio.wait_for(upstream_gone.wait(), timeout=10)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("client closed the connection" in r.getMessage() for r in caplog.records)


async def test_healthz(start_proxy: StartProxy, trap: TrapServer) -> None:
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    status, _, body = await raw_request(proxy, "/healthz")
    assert (status, body) == (200, b"ok\n")


@pytest.mark.parametrize(
    "browser_header",
    [{"Origin": "http://attacker.example"}, {"Sec-Fetch-Mode": "cors"}, {"Sec-Fetch-Site": "cross-site"}],
)
async def test_browser_requests_never_reach_upstream(
    start_proxy: StartProxy, trap: TrapServer, browser_header: dict[str, str]
) -> None:
    """DNS rebinding lets a web page talk to 127.0.0.1 as same-origin; its requests are refused, whatever the Host."""
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    status, _, body = await raw_request(proxy, INFO_REFS, headers={"Host": "attacker.example", **browser_header})
    assert status == 403 and b"web browsers" in body
    assert trap.accepted == 0
