"""Property tests: thousands of hostile requests against a running proxy in front of the fake GitHub.

Whatever arrives, the proxy must not answer 5xx for a request it did not forward, must never connect anywhere but
its configured upstream (a trap socket counts connections), and must never send a credential to a non-git path.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.testing import FakeGitHub
from proxy.testing.harness import start_proxy_app
from tests.support import PRIVATE_FILES, STATIC_TOKEN, TrapServer, static_config

T = TypeVar("T")
EXAMPLES = 1500


@dataclass
class Served:
    proxy_port: int
    fake: FakeGitHub
    trap: TrapServer
    sent: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Fake GitHub and proxy on their own event loop thread, so hypothesis can drive them with plain sockets."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    fake = FakeGitHub(root=Path(tmp_path_factory.mktemp("fuzz")) / "github")
    fake.create_repo("acme/private", PRIVATE_FILES)
    fake.create_repo("octo/public", PRIVATE_FILES, public=True)
    fake.add_token(STATIC_TOKEN, repos=["acme/private"])
    trap = TrapServer()
    run(fake.start())

    runner, _ = run(start_proxy_app(static_config(fake.url)))
    yield Served(runner.addresses[0][1], fake, trap)
    run(runner.cleanup())
    run(fake.close())
    trap.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def send(port: int, raw: bytes, half_close: bool = False) -> int:
    """Send bytes as they are; return the status code, or 0 if the connection was closed without an answer.

    Well-formed requests say `Connection: close`; arbitrary bytes are followed by a half-close instead, so that
    the proxy sees the end of its input rather than waiting for the header timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0


def trap_hosts(port: int) -> list[str]:
    return [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "evil.example", f"github.com@127.0.0.1:{port}"]


SEGMENTS = [
    "github.com", "GitHub.com", "github.com:443", "acme", "private", "private.git", "octo", "public", "other",
    "info", "refs", "git-upload-pack", "git-receive-pack", "lfs", "objects", "batch", "locks", "verify", "unlock",
    "HEAD", "packs", "repos", "contents", "api", "v3", "user", "..", ".", "", "%2e%2e", "%2F", "%00", "%5c", "@",
    "a" * 101, "..git", ".git", "x y", "\\", "~",
]  # fmt: skip
QUERIES = ["", "service=git-upload-pack", "service=git-receive-pack", "service=git-upload-archive",
           "service=git-upload-pack&x=1", "path=a.bin", "%73ervice=git-upload-pack"]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "PROPFIND"]


@st.composite
def request_targets(draw: st.DrawFn, trap_port: int) -> str:
    segments = draw(
        st.lists(
            st.one_of(
                st.sampled_from(SEGMENTS + trap_hosts(trap_port)),
                st.text(alphabet="abcAZ09.-_~%@:!$&'()*+,;=", min_size=0, max_size=8),
            ),
            min_size=0,
            max_size=8,
        )
    )
    prefix = draw(st.sampled_from(["/", "//", "", "http://github.com/", f"http://127.0.0.1:{trap_port}/"]))
    query = draw(st.sampled_from(QUERIES))
    return prefix + "/".join(segments) + (f"?{query}" if query else "")


def _mostly(valid: list[str], hostile: list[str]) -> st.SearchStrategy[str]:
    """Valid about four times in five, so that whole requests are often valid and do get forwarded."""
    good = st.sampled_from(valid)
    bad = st.one_of(st.sampled_from(hostile), st.text("a.-_%@:/", max_size=6))
    return st.integers(0, 9).flatmap(lambda n: good if n < 8 else bad)


@st.composite
def git_like_targets(draw: st.DrawFn, trap_port: int) -> str:
    """Close to real git URLs, one part at a time going wrong, so that many requests do reach the fake."""
    host = draw(_mostly(["github.com", "GITHUB.COM"], [*trap_hosts(trap_port), "github.com.", "github.com:80"]))
    owner = draw(_mostly(["acme", "octo", "ACME"], ["..", "%2e%2e", "", "a" * 101, "acme@x"]))
    repo = draw(_mostly(["private", "private.git", "public", "public.git", "missing"], ["..git", ".git", "%2f"]))
    extra = draw(st.sampled_from(["", "", "", "", "", "", "/x", "/../y", "//"]))
    endpoint = draw(
        _mostly(
            ["info/refs", "git-upload-pack", "git-receive-pack", "info/lfs/objects/batch", "info/lfs/locks"],
            ["HEAD", "objects/info/packs", "info/refs/../x", "info/lfs/locks/1/unlock/more"],
        )
    )
    query = draw(_mostly(["service=git-upload-pack", "service=git-receive-pack"] if endpoint == "info/refs" else [""],
                         QUERIES))  # fmt: skip
    return f"/{host}/{owner}/{repo}{extra}/{endpoint}" + (f"?{query}" if query else "")


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    options = [
        ("Authorization", "Basic eDpzdG9sZW4="), ("Cookie", "a=b"), ("Content-Encoding", "gzip"),
        ("Git-Protocol", "version=2"), ("Host", "evil.example"), ("Connection", "close, Authorization"),
        ("Transfer-Encoding", "chunked"), ("Expect", "100-continue"), ("X-Forwarded-Host", "evil.example"),
        ("Content-Type", "application/x-git-upload-pack-request"),
    ]  # fmt: skip
    return draw(st.lists(st.sampled_from(options), max_size=4, unique=True))


def build_request(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1", "Connection: close"]
    if "host" not in names:
        lines.append("Host: 127.0.0.1")
    lines += [f"{name}: {value}" for name, value in headers]
    if "transfer-encoding" in names:
        body = b"0\r\n\r\n"
    else:
        lines.append("Content-Length: 0")
        body = b""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def check_invariants(served: Served, before: int, status: int) -> None:
    assert served.trap.accepted == 0, "a connection reached a socket that is not a configured upstream"
    forwarded = len(served.fake.seen) > before
    if not forwarded:
        assert status < 500, f"{status} for a request that was never forwarded"
    elif status >= 500:  # upstream's own error passed on, or the proxy's reasoned 502/503/504; never a crash
        assert status in (502, 503, 504) or served.fake.seen[-1].status == status
    for seen in served.fake.seen[before:]:
        assert not (seen.carried_credentials and not seen.is_git), f"credentials sent to {seen.path}"
        assert seen.token in (None, STATIC_TOKEN)  # the client's own Authorization never passes


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_request_line_is_refused_or_forwarded_safely(served: Served, data: st.DataObject) -> None:
    git_like = data.draw(st.integers(0, 9)) < 7
    target = data.draw(git_like_targets(served.trap.port) if git_like else request_targets(served.trap.port))
    likely = "GET" if "info/refs" in target or target.endswith("locks") else "POST"
    method = data.draw(st.integers(0, 9).flatmap(lambda n: st.just(likely) if n < 8 else st.sampled_from(METHODS)))
    headers = data.draw(header_sets())
    before = len(served.fake.seen)
    status = send(served.proxy_port, build_request(method, target, headers))
    served.sent.append(status)
    check_invariants(served, before, status)


@settings(max_examples=EXAMPLES // 3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(min_size=0, max_size=300))
def test_arbitrary_bytes_never_crash_the_proxy(served: Served, raw: bytes) -> None:
    before = len(served.fake.seen)
    status = send(served.proxy_port, raw, half_close=True)
    check_invariants(served, before, status)
    assert send(served.proxy_port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") == 200


SSRF_TARGETS = [
    "/127.0.0.1:{trap}/acme/private.git/info/refs?service=git-upload-pack",
    "/localhost:{trap}/acme/private.git/info/refs?service=git-upload-pack",
    "/github.com@127.0.0.1:{trap}/acme/private.git/info/refs?service=git-upload-pack",
    "/github.com/../127.0.0.1:{trap}/acme/private.git/info/refs?service=git-upload-pack",
    "/github.com/%2e%2e/127.0.0.1:{trap}/info/refs?service=git-upload-pack",
    "//127.0.0.1:{trap}/acme/private.git/info/refs?service=git-upload-pack",
    "/github.com%3A{trap}/acme/private.git/info/refs?service=git-upload-pack",
    "http://127.0.0.1:{trap}/acme/private.git/info/refs?service=git-upload-pack",
]


@pytest.mark.parametrize("target", SSRF_TARGETS)
def test_ssrf_attempts_are_refused_without_a_connection(served: Served, target: str) -> None:
    before = len(served.fake.seen)
    status = send(served.proxy_port, build_request("GET", target.format(trap=served.trap.port), []))
    assert 400 <= status < 500
    assert len(served.fake.seen) == before and served.trap.accepted == 0


def test_connect_is_refused(served: Served) -> None:
    raw = f"CONNECT 127.0.0.1:{served.trap.port} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert send(served.proxy_port, raw) in (400, 405)
    assert served.trap.accepted == 0


def test_the_harness_does_forward_real_git_requests(served: Served) -> None:
    """Guards the property tests: well-formed requests must reach the fake, or they would prove nothing."""
    before = len(served.fake.seen)
    target = "/github.com/acme/private.git/info/refs?service=git-upload-pack"
    assert send(served.proxy_port, build_request("GET", target, [])) == 200
    assert [seen.token for seen in served.fake.seen[before:]] == [STATIC_TOKEN]
