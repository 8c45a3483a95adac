"""Request bodies the proxy reads before it forwards them: whole within a bound, or a head and then the rest as it
comes. Also the bounded inflate for bodies that must be read as they were before their Content-Encoding."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import RequestBodyRefused


async def read_whole_body(request: web.Request, limit: int, within: float) -> bytes:
    """The whole body or a refusal. `content.read(n)` returns what has arrived so far, which is not the body: a
    check made on part of it, forwarded under the client's Content-Length, would leave upstream waiting for the
    rest, and the next request on that connection would be read as that rest (request smuggling). A slow body
    is cut off too: the decision must be made on what the client sent now, not 20 s later after a reload."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise RequestBodyRefused(f"request body of {declared} bytes is over the {limit}-byte limit for this endpoint")
    body = bytearray()
    try:
        async with asyncio.timeout(within):
            while chunk := await request.content.readany():  # b"" only once the body has ended
                body += chunk
                if len(body) > limit:
                    raise RequestBodyRefused(f"request body is over the {limit}-byte limit for this endpoint")
    except TimeoutError:
        raise RequestBodyRefused(f"request body did not arrive within {within:.0f} s") from None
    except (OSError, aiohttp.ClientError, HttpProcessingError):
        raise RequestBodyRefused("request body did not arrive whole (the connection broke)") from None
    if declared is not None and len(body) != declared:
        raise RequestBodyRefused(f"request body has {len(body)} bytes, not the {declared} its Content-Length says")
    return bytes(body)


def inflate_bounded(raw: bytes, encoding: str | None, limit: int) -> bytes | None:
    """A body the proxy must read (a pack request for the mirror, an LFS batch answer) as it was before its
    Content-Encoding, never more than `limit` bytes of it: a few KiB of gzip can inflate to gigabytes. None: an
    encoding the proxy does not read, a corrupt stream, or more than `limit`."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return raw if len(raw) <= limit else None
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    inflater = zlib.decompressobj(wbits=15 if encoding == "deflate" else 31)
    try:
        body = inflater.decompress(raw, limit)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail or not inflater.eof else body


class HeldBytes:
    """A budget for the bodies held in memory across all requests at once (the mirror's pack requests): each
    takes what it holds, and gives it back when done. A body that does not fit is not refused: it is passed on
    as it comes instead (see `peek_body`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size

    @property
    def room(self) -> int:
        return max(0, self.limit - self.held)


_PEEK_STEP = 64 * 1024  # one read's most, reserved from the budget while it waits for bytes


@dataclass
class Peeked:
    """The first bytes of a body. `whole`: they are the whole body. Otherwise the rest is still to be read from
    the request as it comes, after them (the body was longer than the bound, slower than the budget of time, or
    did not fit in what may be held)."""

    head: bytes
    whole: bool
    held: int = 0  # taken from the budget: given back by `release`
    budget: HeldBytes | None = None
    sending: bool = False  # a body generator is sending the head on, and releases it once it went

    def release(self) -> None:
        """Done with the bytes: they stop counting, and this object stops holding them (a head that went on
        while the rest of a long body still streams must not stay in memory for the whole exchange)."""
        if self.budget is not None and self.held:
            self.budget.give_back(self.held)
            self.held = 0
        self.head = b""


async def _read_within_reserve(request: web.Request, reserved: int, budget: HeldBytes) -> bytes:
    """At most `reserved` bytes; what was reserved and not read goes back, whatever happens to the read."""
    chunk = b""
    try:
        chunk = await request.content.read(reserved)
        return chunk
    finally:
        budget.give_back(reserved - len(chunk))


async def peek_body(
    request: web.Request, limit: int, within: float, budget: HeldBytes, progress: Callable[[int], None]
) -> Peeked:
    """Read the body whole if it is at most `limit` bytes, arrives within `within` seconds, and fits in `budget`;
    otherwise stop, and say so: what was read is the head of what goes on. Whatever the client's framing
    (Content-Length or chunked), nothing is lost and nothing is refused for its size: the mirror may answer a
    whole body, and anything else goes upstream as it would without a mirror.

    The budget is taken as bytes arrive, not for what a Content-Length promises: a client that declares 16 MiB
    and drips a byte now and then holds what it sent, not 16 MiB. A body that is not held whole keeps its head
    counted until the head has been sent on (`release`, called by whoever sends it): until then memory holds it,
    so it must count, or bodies that each stop just past the limit would hold far more than the budget between
    them. Nothing is read past what the budget has room for: the budget is never exceeded, and a body that finds
    it full is passed on without a byte read. `progress` hears of each chunk (the transfer watch's byte count)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return Peeked(b"", whole=False)
    head = bytearray()
    peeked = Peeked(b"", whole=False, budget=budget)
    try:
        async with asyncio.timeout(within):
            # limit + 1: a body of exactly `limit` bytes is whole, one byte more is not.
            while room := min(budget.room, limit + 1 - len(head), _PEEK_STEP):
                budget.take(room)  # reserved before the read: other requests peek meanwhile
                chunk = await _read_within_reserve(request, room, budget)
                if not chunk:
                    peeked.whole = True
                    break
                peeked.held += len(chunk)
                head += chunk
                progress(len(chunk))
            else:
                peeked.whole = request.content.at_eof()  # the room ran out just as the body ended
    except TimeoutError:
        pass  # slow: the rest goes on as it comes, under the transfer watch
    except (OSError, aiohttp.ClientError, HttpProcessingError):
        peeked.release()
        raise RequestBodyRefused("request body did not arrive whole (the connection broke)") from None
    peeked.head = bytes(head)
    if peeked.whole and declared is not None and len(head) != declared:
        peeked.release()
        raise RequestBodyRefused(f"request body has {len(head)} bytes, not the {declared} its Content-Length says")
    return peeked


async def read_capped(response: aiohttp.ClientResponse, limit: int, chunk: int = 64 * 1024) -> bytes | None:
    """An answer's body as its session decompressed it, chunk by chunk, or None past `limit` (a gzip bomb stops
    there; the connection is closed rather than drained): GitHub's API answers, read into strict models."""
    chunks, size = [], 0
    async for piece in response.content.iter_chunked(chunk):
        size += len(piece)
        if size > limit:
            response.close()
            return None
        chunks.append(piece)
    return b"".join(chunks)
