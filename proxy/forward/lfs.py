"""LFS through the proxy (lfs.proxyObjects): batch answers rewritten so that storage actions point at handles of
this proxy, and each object moved under its handle, to or from its storage host, under the same rules as git
traffic: the request to storage is built by the proxy, and a download reaches git only if it hashes to its oid."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..access import Client, read_only_party
from ..bodies import read_whole_body
from ..coalesce import pause_after_small_read
from ..config import StorageHostConfig
from ..errors import (
    HandleRefused,
    MethodNotAllowed,
    ReadOnlyRefused,
    RequestBodyRefused,
    StorageRefused,
    UpstreamBadResponse,
    UpstreamUnreachable,
)
from ..lfs import (
    DigestCheck,
    LfsPolicy,
    StorageAction,
    read_batch_answer,
    rewrite_batch_answer,
    storage_request_headers,
    storage_url,
)
from ..logs import sanitise_for_client
from ..metrics import Metrics
from ..routing import Route, Router
from .edge import at_the_edge
from .exchange import Exchange
from .guards import admit
from .phases import Answer, Upload
from .relay import relay
from .upstream import Opened, finish, refuse_control_characters, request_body, send, upstream_errors

log = logging.getLogger("git_token_proxy.forward")

# A verify request is `{"oid": ..., "size": ...}`.
LFS_VERIFY_BODY_LIMIT = 64 * 1024
# What goes back with a rewritten batch answer: it is a new body, so its framing and encoding are the proxy's own.
_NOT_RETURNED_WITH_BATCH = frozenset({"content-length", "content-encoding", "etag", "content-md5"})


async def answer_batch(exchange: Exchange, opened: Opened) -> web.StreamResponse:
    """The batch answer, read whole (bounded) and rewritten so that storage actions point at this proxy."""
    context, route, upstream = exchange.context, exchange.routed, opened.upstream
    assert context.lfs is not None
    try:
        try:
            raw = await read_batch_answer(upstream)
        except (aiohttp.ClientError, TimeoutError):
            raise UpstreamUnreachable(f"{route.upstream.host} broke off its LFS batch answer") from None
        # The Host the client used (already checked): the address under which it reaches this proxy.
        rewritten = rewrite_batch_answer(
            raw, context.lfs, exchange.live.lfs_handles, route, exchange.client, f"http://{exchange.request.host}"
        )
    except BaseException:
        upstream.close()
        raise
    finish(upstream, exchange, complete=True)
    for action, count in rewritten.rewritten.items():
        context.metrics.lfs_actions_rewritten.labels(action).inc(count)
    context.metrics.lfs_actions_passed.inc(rewritten.passed)
    _note_dropped_headers(route, rewritten.dropped, context.lfs, context.metrics)
    headers = CIMultiDict((k, v) for k, v in opened.headers.items() if k.lower() not in _NOT_RETURNED_WITH_BATCH)
    headers["X-Request-Id"] = exchange.request_id
    exchange.status, exchange.bytes_out = upstream.status, len(rewritten.body)
    exchange.answer = Answer.DONE
    return web.Response(status=upstream.status, body=rewritten.body, headers=headers)


def _note_dropped_headers(route: Route, names: list[str], policy: LfsPolicy, metrics: Metrics) -> None:
    """Counted every time, logged once per name and config (a bounded set: a hostile answer invents names)."""
    if not names:
        return
    metrics.lfs_action_headers_dropped.inc(len(names))
    logged = policy.dropped_headers_logged
    for name in {name.lower() for name in names} - logged:
        if len(logged) >= 64:
            return
        logged.add(name)
        log.info("LFS batch answer from %s: action header %r is not sent to storage (not in the allowlist)",
                 route.upstream.host, sanitise_for_client(name, 60))  # fmt: skip


async def forward_lfs_object(request: web.Request) -> web.StreamResponse:
    """/_lfs/<handle>: one object to or from its storage host, under the same rules as git traffic."""
    return await at_the_edge(request, _serve_lfs_object, what="an LFS object")  # its path is a handle: no log line


async def _serve_lfs_object(exchange: Exchange) -> web.StreamResponse:
    request, context = exchange.request, exchange.context
    admit(request, context.allowed_hosts)
    client = await context.access.authenticate(request.headers.get("Authorization"))
    exchange.client = client.name if client else None
    exchange.identity = client.identity if client else None
    if context.lfs is None:
        raise HandleRefused("LFS objects are not served by this proxy (lfs.proxyObjects is off)")
    action = exchange.lfs = exchange.live.lfs_handles.find(request.match_info["handle"], exchange.client)
    exchange.route = action.route
    if request.method != action.method:
        raise MethodNotAllowed(f"{request.method} is not allowed on this LFS {action.action} handle")
    context.access.authorize(client, action.route)  # the rules of now, not of the batch request's time
    if action.method != "GET":
        _refuse_lfs_write(client, action, context.router)
    storage = context.lfs.storage_hosts.get(action.storage_host)
    if storage is None:
        raise HandleRefused(f"storage host {action.storage_host} is no longer in lfs.storageHosts")
    body = await _lfs_request_body(request, action, context.body_timeout)
    uploads = action.method == "PUT"
    async with exchange.in_flight(streams_body=uploads):
        return await _exchange_with_storage(exchange, action, storage, body)


def _refuse_lfs_write(client: Client | None, action: StorageAction, router: Router) -> None:
    """An upload handle exists only if the batch request was allowed to upload; a reload may have made the
    client or the entry read-only since. So the entry is the one of now, found again by its id: the one the
    handle remembers is the batch request's; and an entry that is gone refuses."""
    entry = action.route.entry
    if entry is not None:
        current = router.entry_by_id(entry.id)
        if current is None:
            raise ReadOnlyRefused(f"auth entry {entry.id!r} no longer exists: LFS uploads are refused")
        entry = current
    who = read_only_party(client, entry)
    if who is not None:
        raise ReadOnlyRefused(f"{who} is read-only: LFS uploads to {action.route.repo} are refused")


async def _lfs_request_body(request: web.Request, action: StorageAction, body_timeout: float) -> bytes | None:
    """Verify bodies are small and read whole. An upload streams, with the Content-Length the batch request
    declared for the object: storage gets exactly that many bytes, or the transfer is cut."""
    if action.method == "POST":
        return await read_whole_body(request, LFS_VERIFY_BODY_LIMIT, body_timeout)
    if action.method == "PUT" and request.content_length != action.size:
        raise RequestBodyRefused(f"an LFS upload of this object must carry Content-Length: {action.size}")
    return None


async def _exchange_with_storage(
    exchange: Exchange, action: StorageAction, storage: StorageHostConfig, body: bytes | None
) -> web.StreamResponse:
    where = f"storage host {action.storage_host}"
    upstream = exchange.upstream = await _send_to_storage(exchange, action, storage, body)
    complete = False
    try:
        if exchange.upload is Upload.BROKE:
            raise RequestBodyRefused("the request body broke off before it was complete")
        if not 200 <= upstream.status < 300:
            raise StorageRefused(f"{where} answered HTTP {upstream.status}")
        refuse_control_characters(upstream, where)
        headers = {"X-Request-Id": exchange.request_id}
        if "Content-Type" in upstream.headers:
            headers["Content-Type"] = upstream.headers["Content-Type"]
        response = web.StreamResponse(status=upstream.status, headers=headers)
        exchange.status = response.status
        if action.method == "GET":
            response.content_length = action.size
            chunks = _verified(upstream, exchange, action, where)
            complete = await relay(exchange, response, chunks, " of an LFS object")
        else:
            complete = await relay(exchange, response, _plain(upstream, where))
    finally:
        finish(upstream, exchange, complete)
    return response


async def _send_to_storage(
    exchange: Exchange, action: StorageAction, storage: StorageHostConfig, body: bytes | None
) -> aiohttp.ClientResponse:
    """The request to storage is built by `storage_request_headers`: never a token of ours, nor anything else of
    the client's than its upload's type, nor any framing from the batch answer. A redirect is a non-2xx answer:
    refused, never followed."""
    data, length = request_body(exchange, body)
    content_type = exchange.request.headers.get("Content-Type") if action.method != "GET" else None
    headers = storage_request_headers(action, content_type, length)
    where = f"storage host {action.storage_host}"
    return await send(exchange.context.session, action.method, storage_url(action, storage), where, storage,
                      headers, data)  # fmt: skip


async def _plain(upstream: aiohttp.ClientResponse, where: str) -> AsyncIterator[tuple[bytes, bool]]:
    with upstream_errors(where):
        async for chunk in upstream.content.iter_any():
            yield chunk, False


async def _verified(
    upstream: aiohttp.ClientResponse, exchange: Exchange, action: StorageAction, where: str
) -> AsyncIterator[tuple[bytes, bool]]:
    """The object one chunk behind: the last chunk goes out only once the whole object hashed to its oid, so a
    client never holds all the bytes of a wrong object. On a mismatch the connection is aborted, never ended
    cleanly: git-lfs sees a broken download, not a corrupt file."""
    check, held = DigestCheck(action.oid, action.size), b""
    with upstream_errors(where):
        async for chunk in upstream.content.iter_any():
            if not check.update(chunk):
                break
            if held:
                yield held, False
            pause_after_small_read(upstream, len(chunk), check.received)
            held = chunk
    if check.matches():
        yield held, True
        return
    exchange.context.metrics.lfs_digest_mismatches.inc()
    exchange.aborted = f"the object from storage did not match its oid ({check.received} bytes read)"
    log.warning("LFS object %s from %s: %s; aborting the client connection", action.oid[:16],
                action.storage_host, exchange.aborted)  # fmt: skip
    raise UpstreamBadResponse(exchange.aborted)
