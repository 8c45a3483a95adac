"""Git: the smart-HTTP handler. Admitted at the edge, authenticated, routed and authorized before any token is
fetched; then answered from the mirror (a pack it may serve) or by upstream, streamed back byte for byte."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..access import enforce_read_only
from ..access.writes import LFS_BATCH_LIMIT
from ..bodies import Peeked, peek_body, read_whole_body
from ..errors import AppNotInstalled, ProxyError
from ..routing import LFS_BATCH, UPLOAD_PACK, Service
from .edge import at_the_edge
from .exchange import Exchange
from .guards import admit
from .lfs import answer_batch
from .mirrored import MIRROR_BODY_LIMIT, note_for_mirror, serve_from_mirror
from .push import police_receive_pack, policies_for, read_push_report, refuse_lfs_outside_policy
from .relay import relay
from .upstream import finish, open_upstream, upstream_chunks

if TYPE_CHECKING:
    from ..push.gate import PassOn


async def forward_request(request: web.Request) -> web.StreamResponse:
    return await at_the_edge(request, _forward)


async def _forward(exchange: Exchange) -> web.StreamResponse:
    request, context = exchange.request, exchange.context
    path, _, query = request.raw_path.partition("?")  # raw: the router checks the bytes git actually sent
    admit(request, context.allowed_hosts)
    client = await context.access.authenticate(request.headers.get("Authorization"))
    exchange.client = client.name if client else None
    exchange.identity = client.identity if client else None
    exchange.route = route = context.router.resolve_route(request.method, path, query)
    # Who may do what is settled before a token is fetched: a refused push never costs a mint.
    context.access.authorize(client, route)
    body = await enforce_read_only(request, route, client, context.body_timeout)
    if route.service is Service.LFS and request.method == "POST" and policies_for(exchange, client):
        body = body if body is not None else await read_whole_body(request, LFS_BATCH_LIMIT, context.body_timeout)
        refuse_lfs_outside_policy(exchange, client, body)
    async with exchange.in_flight(streams_body=request.body_exists and body is None):
        checked = await police_receive_pack(exchange, client)
        if isinstance(checked, web.Response):
            return checked  # a refused push: git's own report, and nothing went upstream
        return await _answer(exchange, body if checked is None else checked)


async def _answer(exchange: Exchange, body: bytes | Peeked | PassOn | None) -> web.StreamResponse:
    """From the mirror when it may answer, else from upstream."""
    context, route, request = exchange.context, exchange.routed, exchange.request
    peeked: Peeked | None = None
    try:
        if (
            context.mirror is not None
            and route.endpoint is UPLOAD_PACK
            and (request.content_length or 0) <= MIRROR_BODY_LIMIT
            and context.mirror.covers(route.matched)
        ):
            assert context.held_bodies is not None
            peeked = await peek_body(
                request, MIRROR_BODY_LIMIT, context.body_timeout, context.held_bodies, exchange.count_in
            )
            served = await serve_from_mirror(exchange, peeked)
            if served is not None:
                return served
            body = peeked  # bypass: exactly the bytes the client sent, the rest following as it comes
        opened = await open_upstream(exchange, body)
    except ProxyError as error:
        note_for_mirror(context, route, error)
        if isinstance(error, AppNotInstalled) and route.entry is not None:
            context.metrics.mint_failed(route.entry.id, error)  # a refusal; a public repo read anyway is none
        raise
    finally:
        # A whole body counts until here, which is on the safe side; a head passed on with the rest of its body
        # is released by what sends it, once it went (releasing it here could drop it before it was sent).
        if peeked is not None and not peeked.sending:
            peeked.release()
    note_for_mirror(context, route, opened.upstream.status)
    if route.endpoint is LFS_BATCH and context.lfs is not None and opened.upstream.status == 200:
        return await answer_batch(exchange, opened)
    complete = False
    try:
        # No reason phrase from upstream: it may hold control characters, and git reads only the status code.
        response = web.StreamResponse(status=opened.upstream.status, headers=opened.headers)
        response.headers["X-Request-Id"] = exchange.request_id
        exchange.status = response.status
        chunks = upstream_chunks(opened.upstream, exchange, route.upstream.host)
        complete = await relay(exchange, response, read_push_report(exchange, body, chunks))
    finally:
        finish(opened.upstream, exchange, complete)
        if exchange.mirror is not None:  # a pack request the mirror did not answer: it came from upstream
            context.metrics.mirror_bytes.labels("upstream").inc(exchange.bytes_out)
    return response
