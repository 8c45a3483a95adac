"""Mirrored: a pack request answered from the mirror, and the read authorization that lets it: refs and the right
to read still come from upstream every time (its recent answer must prove the credential), only the pack is local."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from ..bodies import Peeked, inflate_bounded
from ..credentials import Credential
from ..errors import ProxyError, UpstreamBadResponse, UpstreamNeedsAuth, UpstreamRefusedAuth
from ..routing import Route, Service
from .context import ForwardContext
from .exchange import Exchange
from .phases import Upload
from .relay import relay
from .upstream import credential_or_fallback, drain_or_close, timeout_for, upstream_errors

if TYPE_CHECKING:
    from ..mirror import MirrorAnswer

log = logging.getLogger("git_token_proxy.forward")

# A pack request lists wants and haves: even a fetch into a large clone stays far below this. A larger declared
# body goes upstream as usual, streamed.
MIRROR_BODY_LIMIT = 16 * 1024 * 1024
# Only the status of the probe matters. A v2 ref advertisement is its capabilities, a few hundred bytes; an answer
# that goes on past this is not read into memory (a hostile 400 MiB one once took RSS from 75 to 898 MiB).
PROOF_READ_LIMIT = 64 * 1024


async def serve_from_mirror(exchange: Exchange, peeked: Peeked) -> web.StreamResponse | None:
    """A pack from the mirror, or None: the request goes upstream instead (a bypass). This runs only for the pack
    request, after access control, and only while upstream's recent answer proves that the credential can read
    the repo. A body the proxy could not hold whole (too long, too slow, or past what all requests together may
    hold) is a bypass too."""
    from ..mirror import is_pack_request  # loaded already: context.mirror exists

    context, route, request = exchange.context, exchange.routed, exchange.request
    assert context.mirror is not None
    if not peeked.whole:
        exchange.mirror = "bypass"
        context.metrics.mirror_requests.labels("bypass").inc()
        return None
    exchange.upload = Upload.SENT  # the client owes nothing more: a long fill is not a client gone quiet
    # git gzips requests over 1 KiB; upload-pack reads them inflated.
    body = inflate_bounded(peeked.head, request.headers.get("Content-Encoding"), MIRROR_BODY_LIMIT)
    if body is not None and not await asyncio.to_thread(is_pack_request, body):
        return None  # ls-refs: the refs are upstream's, at this moment, like info/refs
    exchange.mirror = "bypass"
    credential = exchange.credential = await credential_or_fallback(exchange)
    answer = None
    if body is not None and await _read_proven(route, credential, context):
        answer = await context.mirror.answer_pack(
            route.matched, body, request.headers.get("Git-Protocol"), route.repo_url, credential
        )
    context.metrics.mirror_requests.labels(answer.outcome if answer else "bypass").inc()
    if answer is None:
        return None
    if exchange.fallback is not None and route.entry is not None:  # a public repo, proven readable anonymously
        exchange.credential_kind = "anonymous"
        context.metrics.anonymous_fallbacks.labels(route.entry.id).inc()
    exchange.mirror = answer.outcome
    return await _stream_mirror_answer(exchange, answer)


async def _read_proven(route: Route, credential: Credential | None, context: ForwardContext) -> bool:
    """Upstream's word, less than `mirror.authTtl` old, that this credential may read this repo. Without it,
    upstream is asked (a ref advertisement, as git's own first request), and its answer is remembered."""
    assert context.proof is not None
    entry_id = route.entry.id if route.entry else None
    if context.proof.holds(entry_id, route.matched):
        return True
    headers = {"Git-Protocol": "version=2"} if credential is None else {
        "Git-Protocol": "version=2", "Authorization": credential.authorization,
    }  # fmt: skip
    try:
        with upstream_errors(route.upstream.host):
            async with context.session.get(
                f"{route.repo_url}/info/refs?service=git-upload-pack", headers=headers, allow_redirects=False,
                timeout=timeout_for(route.upstream),
            ) as answer:  # fmt: skip
                status = answer.status
                await drain_or_close(answer, PROOF_READ_LIMIT)
    except ProxyError:
        return False  # no word from upstream: the request goes there, and gets upstream's own answer
    context.proof.note(entry_id, route.matched, status)
    return context.proof.holds(entry_id, route.matched)


def note_for_mirror(context: ForwardContext, route: Route, outcome: int | ProxyError) -> None:
    """Every upstream answer to a read of a mirrored repo renews or voids the proof."""
    if context.proof is None or route.service is not Service.UPLOAD_PACK:
        return
    if isinstance(outcome, UpstreamRefusedAuth | UpstreamNeedsAuth):
        outcome = 401
    if isinstance(outcome, int):
        context.proof.note(route.entry.id if route.entry else None, route.matched, outcome)


async def _stream_mirror_answer(exchange: Exchange, answer: MirrorAnswer) -> web.StreamResponse:
    headers = {"Content-Type": "application/x-git-upload-pack-result", "Cache-Control": "no-cache",
               "X-Request-Id": exchange.request_id}  # fmt: skip
    response = web.StreamResponse(status=200, headers=headers)
    exchange.status = 200
    try:
        await relay(exchange, response, _mirror_chunks(exchange, answer.chunks), " from the mirror")
    finally:
        await answer.close()
        exchange.context.metrics.mirror_bytes.labels("mirror").inc(exchange.bytes_out)
    return response


async def _mirror_chunks(exchange: Exchange, chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bool]]:
    try:
        async for chunk in chunks:
            yield chunk, False
    except Exception:
        log.exception("mirror answer failed after %d bytes; aborting the client connection", exchange.bytes_out)
        exchange.aborted = "the mirror's upload-pack failed (see the proxy's log)"
        raise UpstreamBadResponse(exchange.aborted) from None
