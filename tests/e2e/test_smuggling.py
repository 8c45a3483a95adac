"""Request smuggling through the proxy's own upstream connections, tried as a hostile local process would.

The proxy keeps upstream connections alive and reuses them for other clients' requests, each carrying its token.
If the proxy ever promises upstream more body bytes than it sends, upstream reads the start of the *next* request
on that connection as the rest of the body, and parses what follows as a request of the attacker's choosing,
with the proxy's Authorization header in it. These tests lay that attack out byte for byte against the fake
GitHub (an aiohttp server, which frames requests as any HTTP/1.1 server does) and check that it fails.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from proxy.testing import FakeGitHub, git_env, run_git_sync
from tests.support import StartProxy, static_config


@dataclass
class Relay:
    """A TCP pipe in front of the fake GitHub that keeps every byte the proxy sent, per upstream connection."""

    target_port: int
    sent: list[bytearray] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)

    async def _pipe(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        record = bytearray()
        self.sent.append(record)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: bytearray | None) -> None:
            try:
                while data := await source.read(65536):
                    if keep is not None:
                        keep += data
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(copy(client_reader, writer, record), copy(reader, client_writer, None))


@pytest.fixture
async def relay(fake_github: FakeGitHub) -> AsyncIterator[Relay]:
    relay = Relay(int(fake_github.url.rsplit(":", 1)[1]))
    await relay.start()
    yield relay
    assert relay.server is not None
    relay.server.close()


def empty_push(commit: str, ref: str) -> bytes:
    """A receive-pack request that points `ref` at a commit the repo already has: a command and an empty pack."""
    line = f"{'0' * 40} {commit} {ref}\0report-status\n".encode()
    pack = b"PACK" + (2).to_bytes(4, "big") + (0).to_bytes(4, "big")
    return f"{len(line) + 4:04x}".encode() + line + b"0000" + pack + hashlib.sha1(pack).digest()


async def exchange(port: int, raw: bytes, then_wait: float = 0.0) -> bytes:
    """Send raw bytes to the proxy; read one answer's head and whatever body comes within a moment."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), timeout=10 + then_wait)
    finally:
        writer.close()


def head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


SMUGGLED = {
    # The push: upstream sees `POST /acme/private/git-receive-pack`, followed by the client's Content-Type and
    # Content-Length and the proxy's Authorization, then the client's body as the pack.
    "push": "POST /acme/private/git-receive-pack HTTP/1.0",
    # The REST call: the token goes to an API path the proxy never forwards.
    "rest": "GET /api/v3/user HTTP/1.0",
}


@pytest.mark.parametrize("payload", ["push", "rest"])
async def test_a_partial_read_only_body_cannot_smuggle_a_request_onto_a_pooled_connection(
    fake_github: FakeGitHub, private_repo: str, relay: Relay, start_proxy: StartProxy, payload: str
) -> None:
    config = static_config(relay.url)
    config["github"]["appInstallation"]["auth"][0]["readOnly"] = True
    # One upstream connection: every request goes over the same one, as it would under load.
    config["server"] = {"maxUpstreamConnections": 1, "headerTimeout": "2s"}
    proxy = await start_proxy(config)
    port = int(proxy.rsplit(":", 1)[1])
    bare, env = fake_github.repo_path(private_repo), git_env(fake_github.root / "home")
    commit = run_git_sync("rev-parse", "main", env=env, cwd=bare).check().stdout.strip()
    pack = empty_push(commit, "refs/heads/pwned") if payload == "push" else b""

    # The second request: a GET whose X-Smuggle value is where the attacker wants upstream to start parsing.
    second = (
        head(
            [
                "GET /github.com/acme/private.git/info/refs?service=git-upload-pack HTTP/1.1",
                f"Host: 127.0.0.1:{port}",
                "X-Request-Id: fixed-id-for-layout",
                f"X-Smuggle: {SMUGGLED[payload]}",
                "Content-Type: application/x-git-receive-pack-request",
                *([f"Content-Length: {len(pack)}"] if pack else []),
            ]
        )
        + pack
    )
    # Calibration: where does that value sit in what the proxy sends upstream? (Harmless on its own.)
    await exchange(port, second)
    sent = bytes(relay.sent[-1]) if relay.sent else b""  # nothing at all, when the proxy refuses that GET
    marker = sent.find(b"X-Smuggle: ")
    offset = max(sent.find(b"\r\n\r\n"), 100) if marker < 0 else marker + len(b"X-Smuggle: ")

    # The first request: an LFS download batch (allowed for the read-only entry) for a repo upstream refuses at
    # once, without reading the body. Its Content-Length covers the JSON that arrives now *and* the first
    # `offset` bytes of whatever the proxy sends next on that connection.
    start = b'{"operation":"download","objects":[]}'
    first = head(
        [
            "POST /github.com/acme/missing.git/info/lfs/objects/batch HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: application/vnd.git-lfs+json",
            f"Content-Length: {len(start) + offset}",
        ]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first + start)  # and nothing more: the rest of the body never comes
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), timeout=10)
    writer.close()
    await exchange(port, second)
    await asyncio.sleep(0.5)

    refs = run_git_sync("for-each-ref", "--format=%(refname)", env=env, cwd=bare).check()
    assert "refs/heads/pwned" not in refs.stdout
    assert not [s for s in fake_github.seen if "receive-pack" in s.path + s.query], "a push reached upstream"
    assert not [s for s in fake_github.seen if s.carried_credentials and not s.is_git], "the token left git paths"
    # The proxy refused the incomplete body instead of passing its head on.
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"did not arrive" in answer
    # And what upstream received was only what the proxy built: no client header outside the allowlist.
    assert all(b"X-Smuggle" not in record for record in relay.sent)
