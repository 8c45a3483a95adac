"""Stateful property test: pairs of requests on one keep-alive connection, and what upstream saw of each.

Whatever the client sends (bodies framed by Content-Length or chunked, gzip or not, any mix of headers), upstream
must receive exactly one request per client request, with the body byte for byte, the allowlisted headers as
sent, none of the others, a framing the proxy verified, and the proxy's credential. Two requests on one connection
catch what one request cannot: a body or a header of the first leaking into the second.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from proxy.testing.harness import start_proxy_app
from tests.support import STATIC_TOKEN, static_config

T = TypeVar("T")
ALLOWED = {
    "Accept": ["*/*", "application/x-git-upload-pack-result", "application/vnd.git-lfs+json"],
    "Accept-Encoding": ["gzip", "deflate, gzip", "identity"],
    "Accept-Language": ["en", "de-CH, en;q=0.5"],
    "Git-Protocol": ["version=2", "version=1"],
    "User-Agent": ["git/2.45.0", "git-lfs/3.5.1 (GitHub; linux amd64; go 1.22)"],
    "Pragma": ["no-cache"],
    "Cache-Control": ["no-cache", "max-age=0"],
}
NOT_ALLOWED = {
    "X-Forwarded-For": "10.1.2.3", "X-Forwarded-Host": "evil.example", "Forwarded": "for=1.2.3.4",
    "Cookie": "session=stolen", "Authorization": "Basic ZXZpbDpldmls",
    "X-Smuggle": "POST /x/y/git-receive-pack HTTP/1.0",
    "Proxy-Authorization": "Basic eDp4", "X-Http-Method-Override": "DELETE", "Range": "bytes=0-10", "Te": "trailers",
}  # fmt: skip
EXPECTED_AUTHORIZATION = "Basic " + base64.b64encode(f"x-access-token:{STATIC_TOKEN}".encode()).decode()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool


@dataclass
class Harness:
    port: int
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[Harness]:
    """A recording upstream and the proxy in front of it, on their own loop thread, for plain blocking sockets."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        seen.append(Seen(request.method, request.path_qs, dict(request.headers), body, chunked))
        return web.Response(body=b"x" * (len(body) % 5000), content_type="application/octet-stream")

    async def start() -> tuple[web.AppRunner, web.AppRunner, int]:
        upstream = web.Application(handler_args={"auto_decompress": False})
        upstream.router.add_route("*", "/{path:.*}", record)
        upstream_runner = web.AppRunner(upstream, access_log=None)
        await upstream_runner.setup()
        await web.TCPSite(upstream_runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{upstream_runner.addresses[0][1]}"
        proxy_runner, _ = await start_proxy_app(static_config(url))
        return upstream_runner, proxy_runner, proxy_runner.addresses[0][1]

    upstream_runner, proxy_runner, port = run(start())
    KeepAliveMachine.harness = Harness(port, seen)
    yield KeepAliveMachine.harness
    run(proxy_runner.cleanup())
    run(upstream_runner.cleanup())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@dataclass
class ClientRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    chunked: bool


ENDPOINTS = [
    ("GET", "/github.com/acme/private.git/info/refs?service=git-upload-pack", "/acme/private.git/info/refs"),
    ("POST", "/github.com/acme/private.git/git-upload-pack", "/acme/private.git/git-upload-pack"),
    ("POST", "/github.com/acme/other/git-receive-pack", "/acme/other/git-receive-pack"),
    ("POST", "/github.com/acme/private.git/info/lfs/objects/batch", "/acme/private.git/info/lfs/objects/batch"),
]


@st.composite
def client_requests(draw: st.DrawFn) -> ClientRequest:
    method, target, _ = draw(st.sampled_from(ENDPOINTS))
    headers = {name: draw(st.sampled_from(values)) for name, values in ALLOWED.items() if draw(st.booleans())}
    headers |= {name: value for name, value in NOT_ALLOWED.items() if draw(st.integers(0, 3)) == 0}
    if method == "GET":
        return ClientRequest(method, target, headers, b"", chunked=False)
    body = draw(st.binary(min_size=0, max_size=3000)) + draw(st.sampled_from([b"", b"0000" * 20000]))
    if draw(st.booleans()):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    headers["Content-Type"] = "application/x-git-upload-pack-request"
    return ClientRequest(method, target, headers, body, chunked=draw(st.booleans()))


def send(connection: http.client.HTTPConnection, request: ClientRequest) -> tuple[int, bytes]:
    connection.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
    connection.putheader("Host", "127.0.0.1")
    for name, value in request.headers.items():
        connection.putheader(name, value)
    if request.method == "POST":
        if request.chunked:
            connection.putheader("Transfer-Encoding", "chunked")
            pieces = [request.body[i : i + 1000] for i in range(0, len(request.body), 1000)]
            connection.endheaders(iter(pieces), encode_chunked=True)
        else:
            connection.putheader("Content-Length", str(len(request.body)))
            connection.endheaders(request.body)
    else:
        connection.endheaders()
    response = connection.getresponse()
    return response.status, response.read()


def check(request: ClientRequest, seen: Seen) -> None:
    _, _, upstream_path = next(e for e in ENDPOINTS if e[1] == request.target)
    assert (seen.method, seen.path.partition("?")[0]) == (request.method, upstream_path)
    assert seen.body == request.body, "the body changed on the way"
    got = {name.lower(): value for name, value in seen.headers.items()}
    for name, value in request.headers.items():
        if name in ALLOWED or name in ("Content-Encoding", "Content-Type"):
            assert got.get(name.lower()) == value, f"{name} did not pass as sent"
        else:
            assert got.get(name.lower()) != value, f"{name} passed although it is not allowlisted"
    assert got["authorization"] == EXPECTED_AUTHORIZATION
    if request.method == "GET":
        assert "content-length" not in got and not seen.chunked
    elif request.chunked:
        assert seen.chunked and "content-length" not in got
    else:
        assert got["content-length"] == str(len(request.body)) and not seen.chunked


class KeepAliveMachine(RuleBasedStateMachine):
    harness: ClassVar[Harness]

    @rule(first=client_requests(), second=client_requests())
    def two_requests_on_one_connection(self, first: ClientRequest, second: ClientRequest) -> None:
        before = len(self.harness.seen)
        connection = http.client.HTTPConnection("127.0.0.1", self.harness.port, timeout=30)
        try:
            for request in (first, second):
                status, _ = send(connection, request)
                assert status == 200, f"{request.method} {request.target}: {status}"
        finally:
            connection.close()
        seen = self.harness.seen[before:]
        assert len(seen) == 2, "upstream must see exactly one request per client request"
        check(first, seen[0])
        check(second, seen[1])


KeepAliveMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=4, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
TestKeepAlivePairs = KeepAliveMachine.TestCase
