"""What a hostile local process can do to the data path: bodies, headers, Host names, patterns, stalled readers.

Each test drives the real proxy with raw bytes where git cannot produce them, in front of the fake GitHub (real
`git http-backend`) or a one-handler upstream, and checks what upstream received as well as what came back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import socket
from typing import Any

import pytest
from aiohttp import web

from proxy.app import PROXY, create_app
from proxy.config import parse_config
from proxy.credentials import Credential
from proxy.routing import RepoRef
from proxy.testing import FakeGitHub
from proxy.testing.harness import start_proxy_app
from tests.support import STATIC_TOKEN, StartProxy, TrapServer, UpstreamApp, static_config
from tests.test_forward import INFO_REFS, config_for, raw_request

LFS_BATCH = "/github.com/acme/private.git/info/lfs/objects/batch"


def read_only_static(url: str, **server: Any) -> dict[str, Any]:
    config = static_config(url)
    config["github"]["appInstallation"]["auth"][0]["readOnly"] = True
    if server:
        config["server"] = server
    return config


async def send_in_segments(port: int, head: bytes, body: bytes, segments: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    size = -(-len(body) // segments)
    for start in range(0, len(body), size):
        writer.write(body[start : start + size])
        await writer.drain()
        await asyncio.sleep(0.05)
    answer = await asyncio.wait_for(reader.read(), timeout=20)
    writer.close()
    return answer


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---------------------------------------------------------------- bodies


async def test_a_large_read_only_lfs_download_batch_passes_when_it_arrives_in_segments(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    objects = [{"oid": f"{i:064x}", "size": i} for i in range(8000)]
    body = json.dumps({"operation": "download", "transfer": ["basic"], "objects": objects}).encode()
    assert 700 * 1024 < len(body) < 1024 * 1024
    proxy = await start_proxy(read_only_static(fake_github.url))
    head = (
        f"POST {LFS_BATCH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/vnd.git-lfs+json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = await send_in_segments(port_of(proxy), head, body, segments=8)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    (seen,) = fake_github.seen
    assert seen.headers["Content-Length"] == str(len(body))


async def test_an_inspected_body_that_never_arrives_is_refused_before_any_token_is_used(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(read_only_static(fake_github.url, headerTimeout="1s"))
    head = (
        f"POST {LFS_BATCH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/vnd.git-lfs+json\r\n"
        "Content-Length: 5000\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(head + b'{"operation":"download"')
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), timeout=20)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"did not arrive within 1 s" in answer
    assert fake_github.seen == []


async def test_an_oversized_inspected_body_is_refused_from_its_content_length(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(read_only_static(fake_github.url))
    status, _, body = await raw_request(
        proxy, LFS_BATCH, "POST", headers={"Content-Type": "application/vnd.git-lfs+json"}, body=b" " * ((1 << 20) + 1)
    )
    assert status == 400 and b"over the 1048576-byte limit" in body
    assert fake_github.seen == []


async def test_a_get_with_a_body_never_reaches_upstream(start_proxy: StartProxy, trap: TrapServer) -> None:
    """The 401 heal resends a GET: with a body (and the client's Content-Length) that would be two requests."""
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    status, _, body = await raw_request(proxy, INFO_REFS, body=b"GET /api/v3/user HTTP/1.1\r\n\r\n")
    assert status == 400 and b"must not carry a body" in body
    assert trap.accepted == 0


async def test_headers_are_bounded_in_number_and_size_and_never_reach_upstream_past_the_bounds(
    start_proxy: StartProxy, trap: TrapServer
) -> None:
    """32 headers of at most 16 KiB: room for git's dozen and a signed identity, and at most 512 KiB a request held
    for an unauthenticated client (500 idle clients sending 100 headers of 16 KiB took 1.6 GB)."""
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    many = {f"X-Extra-{n}": "v" for n in range(40)}
    assert (await raw_request(proxy, INFO_REFS, headers=many))[0] == 400
    huge = {"X-Extra": "v" * (17 * 1024)}
    assert (await raw_request(proxy, INFO_REFS, headers=huge))[0] == 400
    assert trap.accepted == 0


async def test_a_streamed_body_cut_short_never_leaves_a_connection_in_the_pool(
    start_proxy: StartProxy, upstream_app: UpstreamApp
) -> None:
    """The client promises 100 000 bytes, sends 10 and hangs up; upstream, which answers at once, must see that
    connection closed, and the next request must come on a new one."""
    peers: list[tuple[str, int]] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else ("?", 0))
        return web.Response(text="001e# service=git-upload-pack\n0000")

    proxy = await start_proxy(config_for(await upstream_app(handler)) | {"server": {"maxUpstreamConnections": 1}})
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(
        b"POST /github.com/acme/private.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nContent-Length: 100000\r\n\r\n0123456789"
    )
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.transport.abort()
    writer.close()
    await asyncio.sleep(0.2)
    status, _, _ = await raw_request(proxy, INFO_REFS)
    assert status == 200
    assert len(peers) == 2 and peers[0] != peers[1], "the second request reused the half-written connection"


# ---------------------------------------------------------------- headers


async def test_only_allowlisted_client_headers_reach_upstream(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    kept = {
        "Accept": "*/*", "Accept-Encoding": "gzip", "Accept-Language": "en", "Git-Protocol": "version=2",
        "User-Agent": "git/2.45.0", "Pragma": "no-cache", "Cache-Control": "no-cache",
    }  # fmt: skip
    dropped = {
        "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Host": "evil.example", "X-Smuggle": "GET /x HTTP/1.0",
        "Forwarded": "for=1.2.3.4", "X-Http-Method-Override": "DELETE", "Max-Forwards": "0", "Range": "bytes=0-1",
        "If-None-Match": '"x"', "Priority": "u=1", "X-Github-Otp": "123456",
    }  # fmt: skip
    status, _, body = await raw_request(proxy, INFO_REFS, headers={**kept, **dropped, "X-Request-Id": "abc-123"})
    assert status == 200, body
    (seen,) = fake_github.seen
    sent = {name.lower(): value for name, value in seen.headers.items()}
    assert {name.lower(): value for name, value in kept.items()}.items() <= sent.items()
    assert not {name.lower() for name in dropped} & set(sent)
    assert sent["x-request-id"] == "abc-123"
    assert set(sent) <= {*(n.lower() for n in kept), "host", "authorization", "x-request-id"}


# ---------------------------------------------------------------- Host


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:8080", "127.0.0.1.nip.io", ""])
async def test_a_host_that_is_not_loopback_or_allowed_is_refused(
    start_proxy: StartProxy, trap: TrapServer, host: str
) -> None:
    """DNS rebinding without Origin: a same-origin GET from a page on the attacker's name carries its Host."""
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    status, _, body = await raw_request(proxy, INFO_REFS, headers={"Host": host})
    assert status == 421 and b"server.allowedHosts" in body
    assert trap.accepted == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:8080", "[::1]:8080", "git-proxy.internal", "ci:9000"])
async def test_loopback_names_and_allowed_hosts_are_served(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, host: str
) -> None:
    config = static_config(fake_github.url)
    config["server"] = {"allowedHosts": ["Git-Proxy.Internal", "ci:9000"]}
    proxy = await start_proxy(config)
    status, _, _ = await raw_request(proxy, INFO_REFS, headers={"Host": host})
    assert status == 200


async def test_an_allowed_host_with_a_port_allows_only_that_port(start_proxy: StartProxy, trap: TrapServer) -> None:
    config = config_for(f"http://127.0.0.1:{trap.port}")
    config["server"] = {"allowedHosts": ["ci:9000"]}
    proxy = await start_proxy(config)
    status, _, _ = await raw_request(proxy, INFO_REFS, headers={"Host": "ci:9001"})
    assert status == 421 and trap.accepted == 0


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_ops_routes_on_the_git_port_refuse_a_rebound_name_and_browsers(
    start_proxy: StartProxy, trap: TrapServer, path: str
) -> None:
    """A DNS-rebound page reads /metrics (entries, repos, client names) unless the git port's edge guards it too."""
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    status, _, body = await raw_request(proxy, path, headers={"Host": "rebind.attacker.example"})
    assert status == 421 and b"server.allowedHosts" in body
    status, _, _ = await raw_request(proxy, path, headers={"Origin": "http://127.0.0.1"})
    assert status == 403


@pytest.mark.parametrize("host", ["10.1.2.3:8080", "10.1.2.3", "[fd00::5]:8080", "127.0.0.1", "localhost:8080"])
async def test_probes_on_the_git_port_answer_a_pod_ip_as_host(
    start_proxy: StartProxy, trap: TrapServer, host: str
) -> None:
    """kubelet probes (and Prometheus scrapes) name the pod's IP: an address is no rebinding, which needs a name."""
    proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, _ = await raw_request(proxy, path, headers={"Host": host})
        assert status == 200, path
    status, _, _ = await raw_request(proxy, INFO_REFS, headers={"Host": "10.1.2.3:8080"})  # git paths: as before
    assert status == 421 and trap.accepted == 0
    for zoned in ("[fe80::1%evil.example]:8080", "[fe80::1%25rebind.attacker.example]"):  # a zone id is any text
        assert (await raw_request(proxy, "/metrics", headers={"Host": zoned}))[0] == 421


async def test_metrics_on_the_git_port_need_a_client_token_when_access_control_is_on(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    config = static_config(fake_github.url)
    config["access"] = {"clients": [{"name": "prometheus", "token": "scrape-token-000000001", "repos": ["none"]}]}
    proxy = await start_proxy(config)
    status, headers, _ = await raw_request(proxy, "/metrics")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"x:not-the-token").decode()
    assert (await raw_request(proxy, "/metrics", headers={"Authorization": f"Basic {wrong}"}))[0] == 401
    right = base64.b64encode(b"x:scrape-token-000000001").decode()
    status, _, body = await raw_request(proxy, "/metrics", headers={"Authorization": f"Basic {right}"})
    assert status == 200 and b"git_token_proxy_requests_total" in body
    assert (await raw_request(proxy, "/healthz"))[0] == 200  # probes carry no token, and say nothing of the repos


# ---------------------------------------------------------------- patterns


async def test_a_catastrophic_url_pattern_cannot_freeze_the_proxy(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    """With a backtracking engine, each more `a` doubles the time: 34 of them take hours."""
    config = static_config(fake_github.url)
    config["github"]["appInstallation"]["auth"][0]["urlPattern"] = r"(?<baseUrl>github\.com)/acme/([a-z0-9]+-?)+-svc"
    proxy = await start_proxy(config)
    evil = "/github.com/acme/" + "a" * 34 + ".git/info/refs?service=git-upload-pack"
    status, _, _ = await asyncio.wait_for(raw_request(proxy, evil), timeout=10)
    assert status < 500  # matched no entry: forwarded anonymously, and the fake refuses it
    status, _, _ = await asyncio.wait_for(raw_request(proxy, "/healthz"), timeout=10)
    assert status == 200


# ---------------------------------------------------------------- stalled readers


async def test_a_client_that_stops_reading_is_cut_and_frees_the_upstream_connection(
    start_proxy: StartProxy, upstream_app: UpstreamApp
) -> None:
    upstream_closed = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("info/refs"):
            return web.Response(text="001e# service=git-upload-pack\n0000")
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(os.urandom(256 * 1024))
        except (ConnectionError, asyncio.CancelledError):
            upstream_closed.set()
        return response

    config = config_for(await upstream_app(endless))
    config["server"] = {"writeTimeout": "1s", "maxUpstreamConnections": 1}
    runner, _ = await start_proxy_app(config)
    port = runner.addresses[0][1]
    try:
        stalled = await asyncio.open_connection("127.0.0.1", port)
        stalled[1].write(
            b"POST /github.com/acme/private.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
            b"\r\n0000"
        )
        await stalled[1].drain()  # and never read a byte of the answer
        await asyncio.wait_for(upstream_closed.wait(), timeout=20)
        # The only upstream connection is free again: another client gets through.
        status, _, _ = await asyncio.wait_for(raw_request(f"http://127.0.0.1:{port}", INFO_REFS), timeout=10)
        assert status == 200
        metrics = runner.app[PROXY].metrics
        assert metrics.write_stalls._value.get() == 1
        stalled[1].close()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- the edge


class BrokenSource:
    """A credential source with a bug in it: the data path must survive any exception, not just its own."""

    entry_id = "acme-bot"
    identity: object = "broken"

    async def get_credential(self, repo: RepoRef) -> Credential:
        raise RuntimeError("a bug, for example")

    async def invalidate(self, credential: Credential, repo: RepoRef) -> bool:
        return False

    async def recheck_after_not_found(self, credential: Credential, repo: RepoRef) -> bool:
        return False

    def forget_failures(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_an_unexpected_exception_is_a_reasoned_500_with_a_request_id_metric_and_audit_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    app = await create_app(parse_config(static_config("http://127.0.0.1:1")))
    proxy = app[PROXY]
    proxy.live.current = dataclasses.replace(proxy.live.current, sources={"acme-bot": BrokenSource()})
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        status, headers, body = await raw_request(f"http://127.0.0.1:{runner.addresses[0][1]}", INFO_REFS)
    finally:
        await runner.cleanup()
    assert status == 500 and headers["x-request-id"].encode() in body and b"internal error" in body
    assert len([r for r in caplog.records if r.exc_info]) == 1
    (audit,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "git_token_proxy.audit"]
    assert audit["status"] == 500 and audit["reason"]
    assert proxy.metrics.requests.labels("refused", "5xx")._value.get() == 1
    assert proxy.metrics.unexpected_errors._value.get() == 1
    assert STATIC_TOKEN not in caplog.text


# ---------------------------------------------------------------- access scopes and audit lines


async def test_a_client_scoped_to_a_repo_cannot_reach_it_through_another_entrys_base_url(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    config = static_config(fake_github.url)
    auth = config["github"]["appInstallation"]["auth"]
    auth.insert(0, {**auth[0], "id": "team-b", "urlPattern": r"(?<baseUrl>github\.com/team-b)/.*"})
    client_token = "client-token-for-acme-private"
    config["access"] = {"clients": [{"name": "ci", "token": client_token, "repos": [r"github\.com/acme/private"]}]}
    proxy = await start_proxy(config)
    credentials = {"Authorization": "Basic " + base64.b64encode(f"x:{client_token}".encode()).decode()}
    status, _, body = await raw_request(
        proxy, "/github.com/team-b/acme/private.git/info/refs?service=git-upload-pack", headers=credentials
    )
    assert status == 403 and b"may not access github.com/team-b/acme/private" in body
    assert fake_github.seen == []
    status, _, _ = await raw_request(proxy, INFO_REFS, headers=credentials)
    assert status == 200


async def test_the_audit_line_of_a_refused_hostile_path_is_valid_json(
    start_proxy: StartProxy, trap: TrapServer, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.logs import configure_logging

    redactor = configure_logging("INFO")
    audit = logging.getLogger("git_token_proxy.audit")
    lines: list[str] = []
    audit.addHandler(_Collect(lines, audit.handlers[0].filters))
    try:
        proxy = await start_proxy(config_for(f"http://127.0.0.1:{trap.port}"))
        for path in [
            '/github.com/authorization:"x\\/info/refs',
            '/github.com/a/Authorization=abc}"{/x',
            "/x/token%20" + "a" * 20,
        ]:
            await raw_request(proxy, path)
    finally:
        logging.getLogger().handlers.clear()
        audit.handlers.clear()
        audit.propagate = True
    assert redactor is not None and len(lines) == 3
    for line in lines:
        assert json.loads(line)["status"] == 400


class _Collect(logging.Handler):
    """Keeps the formatted audit lines, after the same filters as the real audit handler."""

    def __init__(self, lines: list[str], filters: list[Any]) -> None:
        super().__init__()
        self.lines = lines
        for f in filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# ---------------------------------------------------------------- found by the red team


async def test_a_client_hanging_up_mid_body_after_upstream_answered_frees_the_connection(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    """git http-backend sends its headers before it has read the body. A client that then hangs up used to leave
    upstream waiting for the rest of the body and the proxy for the rest of the answer: the pool's only
    connection was held for good."""
    config = static_config(fake_github.url)
    config["server"] = {"maxUpstreamConnections": 1}
    proxy = await start_proxy(config)
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(
        b"POST /github.com/acme/private.git/git-upload-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-git-upload-pack-request\r\nContent-Length: 100\r\n\r\n0032want "
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    writer.close()
    status, _, _ = await asyncio.wait_for(raw_request(proxy, INFO_REFS), timeout=10)
    assert status == 200


async def test_a_client_that_stops_sending_its_body_is_cut(start_proxy: StartProxy, upstream_app: UpstreamApp) -> None:
    reached: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        reached.append(len(await request.read()))
        return web.Response(text="ok")

    config = config_for(await upstream_app(handler))
    config["server"] = {"writeTimeout": "1s", "maxUpstreamConnections": 1}
    proxy = await start_proxy(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(
        b"POST /github.com/acme/private.git/git-receive-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"0" * 1000
    )  # and then nothing, with the connection left open
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=20) == b""  # cut without an answer
    writer.close()
    status, _, _ = await asyncio.wait_for(raw_request(proxy, INFO_REFS), timeout=10)
    assert status == 200 and reached == [0]  # the next request got the connection; the cut one never completed


async def test_a_non_ascii_client_authorization_is_a_401(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy
) -> None:
    config = static_config(fake_github.url)
    config["access"] = {"clients": [{"name": "a", "token": "client-token-123456", "repos": [".*"]}]}
    proxy = await start_proxy(config)
    raw = (
        f"GET {INFO_REFS} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
        + b"Authorization: Basic \xc3\xa9\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    writer.write(raw)
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # RecursionError in json
        b'{"operation":"download","Operation":"upload","objects":[]}',  # Go reads the last, case-insensitively
        b'{"operation":"upload","operation":"download","objects":[]}',  # a first-key-wins parser reads upload
        b'{"objects":[{"operation":"download"}]}',
    ],
)
async def test_a_read_only_lfs_batch_whose_operation_is_not_plainly_download_is_refused(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, body: bytes
) -> None:
    proxy = await start_proxy(read_only_static(fake_github.url))
    status, _, text = await raw_request(
        proxy, LFS_BATCH, "POST", headers={"Content-Type": "application/vnd.git-lfs+json"}, body=body
    )
    assert status == 403 and b"only LFS downloads" in text
    assert fake_github.seen == []


async def test_bodies_dripped_a_byte_at_a_time_neither_hold_the_pool_nor_outlast_the_rate_floor(
    start_proxy: StartProxy, upstream_app: UpstreamApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 4, item 8: push bodies dripping a byte every 1.5 s, never quiet for writeTimeout, held the whole
    upstream pool, and an ls-remote waited behind them. Bodies still arriving now share all but a quarter of the
    pool, and one that averages under server.minBodyRate over a window is cut."""
    caplog.set_level(logging.INFO)
    reached: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        reached.append(request.method)
        await request.read()
        return web.Response(text="ok")

    config = config_for(await upstream_app(handler))
    config["server"] = {"writeTimeout": "3s", "maxUpstreamConnections": 2}  # rate judged over 3 s; one slot
    proxy = await start_proxy(config)

    async def drip() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
        answer = b""
        with contextlib.suppress(ConnectionError):
            writer.write(b"POST /github.com/acme/private.git/git-receive-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: 1000\r\n\r\n0")  # fmt: skip
            for _ in range(60):
                await asyncio.sleep(0.5)
                if reader.at_eof():
                    break
                writer.write(b"0")
                await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=30)
        writer.close()
        return answer

    drips = [asyncio.create_task(drip()) for _ in range(3)]
    await asyncio.sleep(0.3)
    status, _, _ = await asyncio.wait_for(raw_request(proxy, INFO_REFS), timeout=10)  # not behind the drips
    assert status == 200 and "GET" in reached
    answers = await asyncio.gather(*drips)
    assert answers == [b"", b"", b""]  # each cut in its turn, without an answer a client could take for one
    cut = [m for r in caplog.records if "aborting the transfer" in (m := r.getMessage()) and "minBodyRate" in m]
    assert len(cut) == 3, "each drip was cut for its rate"


async def test_one_clients_slow_bodies_take_at_most_half_of_the_body_slots(
    start_proxy: StartProxy, upstream_app: UpstreamApp
) -> None:
    """With access control on, a client's bodies still arriving take at most half of the body slots: another
    client's push goes upstream while the first one's fill its share (red team, round 4)."""
    arrived: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        arrived.append(request.headers.get("X-Marker", "?"))
        await request.read()
        return web.Response(text="ok")

    config = config_for(await upstream_app(handler))
    config["server"] = {"maxUpstreamConnections": 4}  # three body slots; a client's share: one
    config["access"] = {"clients": [{"name": "a", "token": "token-of-client-a-0001", "repos": [".*"]},
                                    {"name": "b", "token": "token-of-client-b-0001", "repos": [".*"]}]}  # fmt: skip
    proxy = await start_proxy(config)
    port = port_of(proxy)
    writers = []
    for token in ("token-of-client-a-0001", "token-of-client-a-0001", "token-of-client-b-0001"):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        credential = base64.b64encode(f"x:{token}".encode()).decode()
        writer.write(b"POST /github.com/acme/private.git/git-receive-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Basic %s\r\nContent-Length: 100000\r\n\r\n0" % credential.encode())  # fmt: skip
        await writer.drain()
        writers.append(writer)
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    assert len(arrived) == 2, "client a's second body should wait for its share, client b's should not"
    for writer in writers:
        writer.close()


async def test_a_client_reading_an_answer_at_a_trickle_lets_go_of_its_upstream_connection(
    start_proxy: StartProxy, upstream_app: UpstreamApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team, round 4 again: clones that read 1 KiB a second are never quiet for writeTimeout, and eight of
    them held a pool of eight while an ls-remote waited over 45 s. A client that holds an answer up (bytes wait
    for it) must read at least server.minAnswerRate over each window, or its transfer is cut; the next request
    then has the connection."""
    caplog.set_level(logging.INFO)

    answered: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        answered.append(1)
        response = web.StreamResponse(headers={"Content-Type": "application/x-git-upload-pack-advertisement"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(64 if len(answered) == 1 else 1):  # 64 MiB: more than the socket buffers on the way
                await response.write(b"\0" * (1 << 20))
        return response

    config = config_for(await upstream_app(handler))
    config["server"] = {"writeTimeout": "2s", "maxUpstreamConnections": 1, "minAnswerRate": "8KiB"}
    proxy = await start_proxy(config)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_of(proxy)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {INFO_REFS} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()

    def cut() -> list[str]:
        return [m for r in caplog.records if "aborting the transfer" in (m := r.getMessage()) and "minAnswerRate" in m]

    with contextlib.suppress(ConnectionError):
        for _ in range(40):  # 2 KiB a second at most, for up to 20 s (the kernel's buffers hold megabytes)
            if cut() or not await reader.read(1024):
                break
            await asyncio.sleep(0.5)
    writer.close()
    assert cut(), "the slow reader was never cut for its rate"
    status, _, _ = await asyncio.wait_for(raw_request(proxy, INFO_REFS), timeout=10)
    assert status == 200 and len(answered) == 2  # the one upstream connection is free again
