"""Relay: the one loop that streams an answer to git, chunk by chunk, from upstream, the mirror or a storage host;
memory holds one chunk at a time whatever the size."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..errors import ProxyError
from .exchange import Exchange
from .phases import Answer

log = logging.getLogger("git_token_proxy.forward")


async def relay(
    exchange: Exchange, response: web.StreamResponse, chunks: AsyncIterator[tuple[bytes, bool]], what: str = ""
) -> bool:
    """Write each chunk as it comes; True when the whole answer reached the client. `chunks` yields each chunk
    with whether it is the last, and raises a ProxyError when its side fails mid-answer (having set
    `exchange.aborted` if it has more to say). `what` finishes log lines: "", " from the mirror", …

    The status line goes out before the body is read, as upstream sent it: a connection that dies with no byte of
    an answer is one that git's libcurl takes for a stale keep-alive and sends the request on again (a push twice).
    After that, no refusal can follow: a failure aborts the connection, so that git sees a broken transfer and
    never takes a truncated pack for a whole one."""
    await response.prepare(exchange.request)
    exchange.answer = Answer.STREAMING
    # When the last chunk is known as such, it goes out with the chunked terminator in one send. Only for a
    # chunked answer: aiohttp's write_eof does not hold a body to its Content-Length the way write does.
    chunked = response.content_length is None
    try:
        async for chunk, last in chunks:
            if last and chunked:
                await response.write_eof(chunk)
            else:
                await response.write(chunk)
            exchange.bytes_out += len(chunk)
        await response.write_eof()  # a no-op when the last chunk has ended the answer already
        exchange.answer = Answer.DONE
        return True
    # ConnectionError first: aiohttp's "Connection lost" too. A client that hangs up mid-clone (Ctrl-C), or is cut
    # for going quiet, is routine, not an upstream failure worth a traceback.
    except ConnectionError:
        exchange.cut("client")
        if not exchange.aborted:
            log.info("client closed the connection after %d bytes%s", exchange.bytes_out, what)
    except ProxyError as error:  # the answer's side failed
        exchange.cut("upstream")
        if not exchange.aborted:  # else it is said already (the source's own words, or the watch's cut)
            log.warning("%s after %d bytes%s; aborting the client connection", error, exchange.bytes_out, what)
        abort_client(exchange)
    except Exception:
        log.exception("unexpected error after %d bytes%s; aborting the client connection", exchange.bytes_out, what)
        exchange.aborted = "internal error (see the proxy's log)"
        exchange.cut("proxy")
        abort_client(exchange)
    return False


def abort_client(exchange: Exchange) -> None:
    if exchange.request.transport is not None:
        exchange.request.transport.abort()
