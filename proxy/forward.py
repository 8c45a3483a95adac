"""Forward: stream one git request to its upstream with the credential added, and the answer back, byte for byte."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .credentials import Credential, CredentialSource
from .errors import (
    AnonymousRefused,
    AppNotInstalled,
    BadRequestPath,
    BrowserRequestRefused,
    CredentialError,
    GitHubUnavailable,
    HostNotAllowed,
    MethodNotAllowed,
    NotAGitEndpoint,
    ProxyError,
    RateLimited,
    UpstreamBadRedirect,
    UpstreamNeedsAuth,
    UpstreamRefusedAuth,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .routing import Route, Router

log = logging.getLogger("git_token_proxy.forward")

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
    sources: Mapping[str, CredentialSource]
    session: aiohttp.ClientSession


FORWARD_CONTEXT = web.AppKey("forward_context", ForwardContext)


async def forward_request(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    context = request.app[FORWARD_CONTEXT]
    path, _, query = request.raw_path.partition("?")  # raw: the router checks the bytes git actually sent
    route: Route | None = None
    try:
        _refuse_browsers(request.headers)
        route = context.router.resolve_route(request.method, path, query)
        opened = await _open_upstream(request, route, context)
    except ProxyError as error:
        return _refuse(request, error, route)
    response = web.StreamResponse(status=opened.upstream.status, reason=opened.upstream.reason, headers=opened.headers)
    try:
        sent = await _stream_back(request, opened.upstream, response)
    finally:
        opened.upstream.release()
    log.info(
        "%s %s %s -> %d (entry %s, %s, %d bytes, %.3fs)",
        request.method, route.repo, route.service, response.status, route.entry.id if route.entry else "-",
        opened.credential.origin if opened.credential else "anonymous", sent, time.monotonic() - started,
    )  # fmt: skip
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


async def _open_upstream(request: web.Request, route: Route, context: ForwardContext) -> _Opened:
    """Send the request upstream; a 401 on a replayable request gets one fresh credential and one retry."""
    source = context.sources[route.entry.id] if route.entry else None
    credential = await source.get_credential(route.repo) if source else None
    upstream = await _send(request, route, credential, context.session)
    if upstream.status == 401 and source and credential:
        # Whatever the method, a rejected token leaves the cache (LFS is all POSTs). Only a request without a
        # body can be sent again: GET info/refs, which opens every git operation.
        renewable = await source.invalidate(credential, route.repo)
        if renewable and request.method == "GET":
            upstream.release()
            credential = await source.get_credential(route.repo)
            upstream = await _send(request, route, credential, context.session)
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


def _refuse(request: web.Request, error: ProxyError, route: Route | None) -> web.Response:
    status = status_for(error)
    where = str(route.repo) if route else repr(request.raw_path[:200])
    log.log(
        logging.WARNING if status >= 500 else logging.INFO, "%s %s refused %d: %s", request.method, where, status, error
    )
    # text/plain: git prints each line as `remote: ...`; no WWW-Authenticate, so git never prompts.
    return web.Response(status=status, text=f"{error}\n", content_type="text/plain")


async def _send(
    request: web.Request, route: Route, credential: Credential | None, session: aiohttp.ClientSession
) -> aiohttp.ClientResponse:
    timeout = aiohttp.ClientTimeout(
        total=None,  # a clone of a large repo may take an hour; only silence is an error
        sock_connect=route.upstream.connect_timeout,
        sock_read=route.upstream.read_timeout,
    )
    try:
        return await session.request(
            request.method,
            route.url,
            headers=_upstream_headers(request.headers, credential),
            data=_request_body(request),
            timeout=timeout,
            allow_redirects=False,  # a redirect must never carry the token to another URL
        )
    # TimeoutError first: aiohttp's connect and read timeouts are ClientErrors too.
    except TimeoutError:
        raise UpstreamTimeout(f"{route.upstream.host} did not answer in time") from None
    except aiohttp.ClientConnectorError as error:
        raise UpstreamUnreachable(f"cannot connect to {route.upstream.host}: {error.strerror}") from None
    except aiohttp.ClientError as error:
        raise UpstreamUnreachable(f"request to {route.upstream.host} failed: {type(error).__name__}") from None


def _request_body(request: web.Request) -> AsyncIterator[bytes] | None:
    # The app runs with auto_decompress=False, so these are the bytes git sent, gzip and all. With a
    # Content-Length header the upstream request keeps it; without one (a large push) it goes out chunked.
    if not request.body_exists:
        return None
    return request.content.iter_any()


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
