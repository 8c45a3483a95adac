"""Forward: stream one git request to its upstream with the credential added, and the answer back, byte for byte."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .access import AccessControl, enforce_read_only
from .credentials import Credential, CredentialSource
from .errors import (
    AnonymousRefused,
    AppNotInstalled,
    AuthenticationRequired,
    BadRequestPath,
    BrowserRequestRefused,
    ClientForbidden,
    CredentialError,
    GitHubUnavailable,
    HostNotAllowed,
    MethodNotAllowed,
    NotAGitEndpoint,
    ProxyError,
    RateLimited,
    ReadOnlyRefused,
    UpstreamBadRedirect,
    UpstreamNeedsAuth,
    UpstreamRefusedAuth,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .logs import REQUEST_ID
from .metrics import REFUSED, Metrics
from .routing import Route, Router

log = logging.getLogger("git_token_proxy.forward")
audit_log = logging.getLogger("git_token_proxy.audit")

# Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection, not to the message. `Host` is ours to set,
# `Expect` is answered by our own server, and the client's own `Authorization`/`Cookie` are never passed on:
# upstream must only ever see the credential this proxy chose.
_NOT_FORWARDED = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host", "expect",
     "authorization", "cookie"}
)  # fmt: skip
# `WWW-Authenticate` would make git prompt for a password it must never need; cookies stay with the proxy.
_NOT_RETURNED = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "www-authenticate",
     "set-cookie", "location"}
)  # fmt: skip

# The one place where a reason becomes a status. Lookups walk the exception's MRO, so a subclass of
# CredentialError may bring its own status later without touching this table's callers.
_STATUS: dict[type[ProxyError], int] = {
    BadRequestPath: 400,
    NotAGitEndpoint: 404,
    MethodNotAllowed: 405,
    HostNotAllowed: 403,
    AnonymousRefused: 403,
    AuthenticationRequired: 401,
    ClientForbidden: 403,
    ReadOnlyRefused: 403,
    BrowserRequestRefused: 403,
    UpstreamNeedsAuth: 403,
    AppNotInstalled: 403,
    CredentialError: 502,  # JwtRejected, GitHubRefused and anything else a token source cannot overcome
    RateLimited: 503,
    GitHubUnavailable: 503,
    UpstreamRefusedAuth: 502,
    UpstreamUnreachable: 502,
    UpstreamBadRedirect: 502,
    UpstreamTimeout: 504,
}


def status_for(error: ProxyError) -> int:
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 502


@dataclass(frozen=True)
class ForwardContext:
    """Everything a request needs, built once per config by `app`."""

    router: Router
    access: AccessControl
    sources: Mapping[str, CredentialSource]
    session: aiohttp.ClientSession
    metrics: Metrics


@dataclass
class LiveContext:
    """A reload replaces `current` in one assignment; a request keeps the context it started with to its end."""

    current: ForwardContext


FORWARD_CONTEXT = web.AppKey("forward_context", LiveContext)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class _Exchange:
    """One request as the audit log reports it, filled in as it moves along the data path."""

    started: float
    request_id: str
    route: Route | None = None
    client: str | None = None
    credential: Credential | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reason: str | None = None


async def forward_request(request: web.Request) -> web.StreamResponse:
    context = request.app[FORWARD_CONTEXT].current
    exchange = _Exchange(time.monotonic(), _request_id(request))
    REQUEST_ID.set(exchange.request_id)  # every log line of this request (and of a mint it starts) carries it
    context.metrics.in_flight.inc()
    try:
        return await _forward(request, context, exchange)
    finally:
        context.metrics.in_flight.dec()
        _record(context.metrics, exchange)
        _audit(request, exchange)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


async def _forward(request: web.Request, context: ForwardContext, exchange: _Exchange) -> web.StreamResponse:
    path, _, query = request.raw_path.partition("?")  # raw: the router checks the bytes git actually sent
    try:
        _refuse_browsers(request.headers)
        client = context.access.authenticate(request.headers.get("Authorization"))
        exchange.client = client.name if client else None
        exchange.route = route = context.router.resolve_route(request.method, path, query)
        # Who may do what is settled before a token is fetched: a refused push never costs a mint.
        context.access.authorize(client, route)
        body = await enforce_read_only(request, route, client)
        opened = await _open_upstream(request, route, context, exchange, body)
    except ProxyError as error:
        return _refuse(error, exchange)
    response = web.StreamResponse(status=opened.upstream.status, reason=opened.upstream.reason, headers=opened.headers)
    response.headers["X-Request-Id"] = exchange.request_id
    exchange.status = response.status
    try:
        exchange.bytes_out = await _stream_back(request, opened.upstream, response)
    finally:
        opened.upstream.release()
    return response


def _refuse_browsers(headers: CIMultiDictProxy[str]) -> None:
    """A web page can reach 127.0.0.1 too (DNS rebinding makes it same-origin). Browsers always mark their
    requests with Origin or Sec-Fetch-*; git never does. So such a request never gets near a token."""
    if "Origin" in headers or any(name.lower().startswith("sec-fetch-") for name in headers):
        raise BrowserRequestRefused("requests from web browsers are refused; this proxy serves git clients only")


@dataclass(frozen=True)
class _Opened:
    upstream: aiohttp.ClientResponse
    credential: Credential | None
    headers: CIMultiDict[str]  # what goes back to git


async def _open_upstream(
    request: web.Request, route: Route, context: ForwardContext, exchange: _Exchange, body: bytes | None
) -> _Opened:
    """Send the request upstream; a 401 on a replayable request gets one fresh credential and one retry."""
    source = context.sources[route.entry.id] if route.entry else None
    credential = exchange.credential = await _credential(source, route, context.metrics)
    upstream = await _send(request, route, credential, context, exchange, body)
    if upstream.status == 401 and source and credential:
        # Whatever the method, a rejected token leaves the cache (LFS is all POSTs). Only a request without a
        # body can be sent again: GET info/refs, which opens every git operation.
        renewable = await source.invalidate(credential, route.repo)
        if renewable and request.method == "GET":
            upstream.release()
            credential = exchange.credential = await _credential(source, route, context.metrics)
            upstream = await _send(request, route, credential, context, exchange, body)
    try:
        _check_status(upstream, route, credential)
        return _Opened(upstream, credential, _response_headers(upstream, route))
    except ProxyError:
        upstream.release()
        raise


async def _stream_back(request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> int:
    """Copy the body as it arrives; memory holds one chunk at a time whatever the repo size."""
    sent = 0
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
    # ConnectionResetError first: aiohttp's ClientConnectionResetError is also a ClientError, and a client
    # that hangs up mid-clone (Ctrl-C) is routine, not an upstream failure worth a traceback.
    except ConnectionResetError:
        log.info("client closed the connection after %d bytes", sent)
        upstream.close()
    except (aiohttp.ClientError, TimeoutError) as error:
        # The status line is already out. Ending the body cleanly would let git take a truncated pack for a
        # complete one, so the connection is aborted and git reports the failure.
        log.warning("upstream failed after %d bytes (%s); aborting the client connection", sent, type(error).__name__)
        upstream.close()
        if request.transport is not None:
            request.transport.abort()
    return sent


def _refuse(error: ProxyError, exchange: _Exchange) -> web.Response:
    exchange.status, exchange.reason = status_for(error), str(error)
    headers = {"X-Request-Id": exchange.request_id}
    if exchange.status == 401:  # only access control's own challenge may make git ask for a password
        headers["WWW-Authenticate"] = 'Basic realm="git-token-proxy"'
    # text/plain: git prints each line as `remote: ...`.
    return web.Response(status=exchange.status, text=f"{error}\n", content_type="text/plain", headers=headers)


def _record(metrics: Metrics, exchange: _Exchange) -> None:
    served = exchange.route is not None and exchange.reason is None
    service = exchange.route.service.value if served and exchange.route else REFUSED
    metrics.requests.labels(service, f"{exchange.status // 100}xx").inc()
    metrics.received_bytes.labels(service).inc(exchange.bytes_in)
    metrics.sent_bytes.labels(service).inc(exchange.bytes_out)


def _audit(request: web.Request, exchange: _Exchange) -> None:
    """One JSON line per request: who, which repo, what happened, how much. Never a token, only its fingerprint."""
    route, credential = exchange.route, exchange.credential
    record = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": exchange.request_id,
        "client": exchange.client,
        "method": request.method,
        "host": route.upstream.host if route else None,
        "repo": route.repo.full_name if route else None,
        "service": route.service.value if route else None,
        "status": exchange.status,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "duration_ms": round((time.monotonic() - exchange.started) * 1000, 1),
        "entry": route.entry.id if route and route.entry else None,
        "token": credential.origin if credential else None,
        "token_sha256": credential.fingerprint if credential else None,
    }
    if exchange.reason:
        record["reason"] = exchange.reason
    if not route:
        record["path"] = request.raw_path.partition("?")[0][:200]  # no query: it is the one place a secret could be
    audit_log.info("%s", json.dumps(record, separators=(",", ":")))


async def _credential(source: CredentialSource | None, route: Route, metrics: Metrics) -> Credential | None:
    if source is None:
        return None
    credential = await source.get_credential(route.repo)
    if credential.origin == "cached":
        metrics.cache_hits.labels(source.entry_id).inc()
    elif credential.origin == "minted":
        metrics.cache_misses.labels(source.entry_id).inc()
    return credential


async def _send(
    request: web.Request,
    route: Route,
    credential: Credential | None,
    context: ForwardContext,
    exchange: _Exchange,
    body: bytes | None,
) -> aiohttp.ClientResponse:
    timeout = aiohttp.ClientTimeout(
        total=None,  # a clone of a large repo may take an hour; only silence is an error
        sock_connect=route.upstream.connect_timeout,
        sock_read=route.upstream.read_timeout,
    )
    started = time.monotonic()
    try:
        response = await context.session.request(
            request.method,
            route.url,
            headers=_upstream_headers(request.headers, credential),
            data=_request_body(request, exchange) if body is None else _counted_bytes(body, exchange),
            timeout=timeout,
            allow_redirects=False,  # a redirect must never carry the token to another URL
        )
        context.metrics.upstream_latency.labels(route.service.value).observe(time.monotonic() - started)
        return response
    # TimeoutError first: aiohttp's connect and read timeouts are ClientErrors too.
    except TimeoutError:
        raise UpstreamTimeout(f"{route.upstream.host} did not answer in time") from None
    except aiohttp.ClientConnectorError as error:
        raise UpstreamUnreachable(f"cannot connect to {route.upstream.host}: {error.strerror}") from None
    except aiohttp.ClientError as error:
        raise UpstreamUnreachable(f"request to {route.upstream.host} failed: {type(error).__name__}") from None


def _request_body(request: web.Request, exchange: _Exchange) -> AsyncIterator[bytes] | None:
    # The app runs with auto_decompress=False, so these are the bytes git sent, gzip and all. With a
    # Content-Length header the upstream request keeps it; without one (a large push) it goes out chunked.
    if not request.body_exists:
        return None
    return _counted(request.content, exchange)


def _counted_bytes(body: bytes, exchange: _Exchange) -> bytes:
    exchange.bytes_in += len(body)
    return body


async def _counted(content: aiohttp.StreamReader, exchange: _Exchange) -> AsyncIterator[bytes]:
    async for chunk in content.iter_any():
        exchange.bytes_in += len(chunk)
        yield chunk


def _upstream_headers(headers: CIMultiDictProxy[str], credential: Credential | None) -> CIMultiDict[str]:
    connection = ",".join(headers.getall("Connection", ()))  # may come as several header lines
    named_by_connection = {name.strip().lower() for name in connection.split(",")}
    out = CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if (lower := name.lower()) not in _NOT_FORWARDED
        and lower not in named_by_connection
        and not lower.startswith("proxy-")
    )
    if credential:
        out["Authorization"] = credential.authorization
    return out


def _check_status(upstream: aiohttp.ClientResponse, route: Route, credential: Credential | None) -> None:
    if upstream.status == 401:
        # git prompts for a password on any 401, so it never sees one: it gets a reason instead.
        if credential:
            raise UpstreamRefusedAuth(
                f"{route.upstream.host} rejected the credential of auth entry {route.entry.id if route.entry else ''!r}"
                f" for {route.repo.full_name} (HTTP 401)"
            )
        raise UpstreamNeedsAuth(f"{route.repo} needs credentials and no auth entry of this proxy matches it")


def _response_headers(upstream: aiohttp.ClientResponse, route: Route) -> CIMultiDict[str]:
    out = CIMultiDict((name, value) for name, value in upstream.headers.items() if name.lower() not in _NOT_RETURNED)
    if "Location" in upstream.headers:
        out["Location"] = _rewrite_location(upstream.headers["Location"], route)
    return out


def _rewrite_location(location: str, route: Route) -> str:
    """A redirect is passed back only if it stays on the same upstream, and then points at this proxy."""
    base = route.upstream.url
    if location.startswith(base + "/"):
        return route.proxy_prefix + location[len(base) :]
    if location.startswith("/") and not location.startswith("//") and base.count("/") == 2:
        return route.proxy_prefix + location
    raise UpstreamBadRedirect(f"{route.upstream.host} redirected to another host; the proxy does not follow it")
