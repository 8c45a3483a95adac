"""Fewer, larger reads from upstream: the pause after a small read, on real sockets, and through the proxy."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.coalesce import AFTER, PAUSE, SMALL_READ, pause_after_small_read
from tests.support import StartProxy, UpstreamApp
from tests.test_forward import config_for, raw_request

UPLOAD_PACK = "/github.com/acme/private.git/git-upload-pack"


async def first_then_last(upstream_app: UpstreamApp) -> tuple[str, asyncio.Event]:
    """A real upstream that answers b"first" at once and b"last" once the event is set."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await release.wait()
        await response.write_eof(b"last")
        return response

    return await upstream_app(slow), release


@pytest.fixture
async def answer(upstream_app: UpstreamApp) -> AsyncIterator[aiohttp.ClientResponse]:
    """An answer whose body is still coming: its connection is this answer's."""
    url, release = await first_then_last(upstream_app)
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert await response.content.readany() == b"first"
        yield response
        release.set()


def transport_of(answer: aiohttp.ClientResponse) -> asyncio.Transport:
    assert answer.connection is not None and answer.connection.transport is not None
    return answer.connection.transport


async def test_a_small_read_mid_answer_pauses_reading_briefly(answer: aiohttp.ClientResponse) -> None:
    pause_after_small_read(answer, read=SMALL_READ - 1, answered=AFTER)
    assert not transport_of(answer).is_reading()
    await asyncio.sleep(PAUSE * 5)
    assert transport_of(answer).is_reading()


@pytest.mark.parametrize(
    ("read", "answered"),
    [(SMALL_READ, AFTER), (SMALL_READ - 1, AFTER - 1)],
    ids=["a large read: the proxy is not keeping pace piece by piece", "early in the answer: latency first"],
)
async def test_no_pause(answer: aiohttp.ClientResponse, read: int, answered: int) -> None:
    pause_after_small_read(answer, read, answered)
    assert transport_of(answer).is_reading()


async def test_a_pause_made_by_flow_control_is_left_alone(answer: aiohttp.ClientResponse) -> None:
    transport_of(answer).pause_reading()  # as aiohttp does while the client reads slower than upstream sends
    pause_after_small_read(answer, read=1, answered=AFTER)
    await asyncio.sleep(PAUSE * 5)
    assert not transport_of(answer).is_reading()


async def test_a_resume_due_after_the_answer_ended_leaves_the_next_exchange_alone(upstream_app: UpstreamApp) -> None:
    """aiohttp resumes reading by itself when its buffer drains, so an answer can end, and its connection go back
    to the pool, with the proxy's resume still to come. By then the transport is another exchange's."""
    url, release = await first_then_last(upstream_app)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as first:
            assert await first.content.readany() == b"first"
            transport = transport_of(first)
            pause_after_small_read(first, read=1, answered=AFTER)
            transport.resume_reading()  # aiohttp's own resume
            release.set()
            assert await first.read() == b"last"
        transport.pause_reading()  # the pooled connection, paused by the flow control of whoever holds it next
        await asyncio.sleep(PAUSE * 5)
        assert not transport.is_reading()
        assert not transport.is_closing()  # the same keep-alive connection: the check above meant something


def chunks_of(payload: bytes) -> list[bytes]:
    """The chunks of a chunked body, checking its framing."""
    chunks, rest = [], payload
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


async def test_a_trickling_pack_arrives_whole_in_fewer_larger_chunks(
    start_proxy: StartProxy, upstream_app: UpstreamApp
) -> None:
    """Upstream writes 3 MiB in 4 KiB pieces, one per turn of the event loop, as a pack comes over a slow link. The
    bytes reach the client untouched, and past the first MiB the proxy passes them on in far fewer, larger pieces
    than upstream wrote them (it used to read, and send, each piece as it came)."""
    pack = os.urandom(3 << 20)
    piece = 4096

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-git-upload-pack-result"})
        await response.prepare(request)
        for start in range(0, len(pack), piece):
            await response.write(pack[start : start + piece])
            await asyncio.sleep(0)  # one turn of the loop: the proxy reads each piece as it comes
        await response.write_eof()
        return response

    proxy = await start_proxy(config_for(await upstream_app(trickle)))
    status, headers, payload = await raw_request(proxy, UPLOAD_PACK, method="POST", body=b"0000")
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    chunks = chunks_of(payload)
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(pack).digest()
    after_the_first_mib, passed_on = 0, 0
    for chunk in chunks:
        if passed_on >= AFTER:
            after_the_first_mib += 1
        passed_on += len(chunk)
    written_after_it = (len(pack) - AFTER) // piece
    # Here: about 14 chunks with the pause, 256 without (the proxy then read about two pieces at a time).
    assert after_the_first_mib < written_after_it / 4, (after_the_first_mib, written_after_it)
