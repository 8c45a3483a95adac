"""Upstream: the request that leaves the proxy, built by it (headers from an allowlist, a length it verified, one
request per exchange), sent with the credential, retried once with a fresh token, and its answer checked before
a byte of it goes back. The one place where aiohttp's exceptions become the proxy's reasons."""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ..access import is_write
from ..bodies import Peeked
from ..coalesce import pause_after_small_read
from ..credentials import Credential, CredentialSource
from ..errors import (
    AppNotInstalled,
    PushNotPermitted,
    RequestBodyRefused,
    UpstreamBadRedirect,
    UpstreamBadResponse,
    UpstreamNeedsAuth,
    UpstreamRefusedAuth,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ..metrics import Metrics
from ..routing import INFO_REFS, Route, Service
from .exchange import Exchange
from .phases import Upload

if TYPE_CHECKING:
    from ..push.gate import PassOn

# What upstream receives is built by the proxy. Of the client's headers only these pass: git's and LFS's own, and
# the caches' advice. Everything else (hop-by-hop headers, Host, Expect, Transfer-Encoding, the client's own
# Authorization and Cookie, X-Forwarded-*, whatever a hostile process invents) stays here. Content-Length is set by
# the proxy from a length it verifies, and X-Request-Id is the proxy's own (sanitised) id.
FORWARDED_REQUEST_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "content-type", "content-encoding", "git-protocol",
     "user-agent", "pragma", "cache-control"}
)  # fmt: skip
# `WWW-Authenticate` would make git prompt for a password it must never need; cookies stay with the proxy.
NOT_RETURNED = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "www-authenticate",
     "set-cookie", "location"}
)  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in header values
_ONE_WRITE = 1 << 20  # aiohttp's own threshold (payload.TOO_LARGE_BYTES_BODY)


class Timeouts(Protocol):
    """An upstream's or a storage host's settings: how long to connect, and the longest silence."""

    connect_timeout: float
    read_timeout: float


def timeout_for(host: Timeouts) -> aiohttp.ClientTimeout:
    """No total: a clone of a large repo may take an hour; only silence is an error."""
    return aiohttp.ClientTimeout(total=None, sock_connect=host.connect_timeout, sock_read=host.read_timeout)


@contextlib.contextmanager
def upstream_errors(where: str) -> Iterator[None]:
    """aiohttp's exceptions, while sending to or reading from `where` ("github.com", "storage host …"), said as
    the proxy's reasons. TimeoutError first: aiohttp's connect and read timeouts are ClientErrors too."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(f"{where} did not answer in time") from None
    except aiohttp.ClientConnectorError as error:
        raise UpstreamUnreachable(f"cannot connect to {where}: {error.strerror}") from None
    except aiohttp.ClientError as error:
        raise UpstreamUnreachable(f"request to {where} failed: {type(error).__name__}") from None


async def send(
    session: aiohttp.ClientSession, method: str, url: str, where: str, host: Timeouts,
    headers: CIMultiDict[str] | dict[str, str], data: object = None,
) -> aiohttp.ClientResponse:  # fmt: skip
    """One request, never a redirect followed: a redirect must never carry a credential to another URL."""
    with upstream_errors(where):
        return await session.request(
            method, url, headers=headers, data=data, timeout=timeout_for(host), allow_redirects=False
        )


@dataclass(frozen=True)
class Opened:
    upstream: aiohttp.ClientResponse
    credential: Credential | None
    headers: CIMultiDict[str]  # what goes back to git


async def open_upstream(exchange: Exchange, body: bytes | Peeked | PassOn | None) -> Opened:
    """Send the request upstream; a dead token on a replayable request gets one fresh credential and one retry."""
    route, source = exchange.routed, exchange.source
    credential = exchange.credential = await credential_or_fallback(exchange)
    upstream = exchange.upstream = await _send_git(exchange, credential, body)
    try:
        _refuse_if_body_broke(exchange)
        _refuse_failed_fallback(upstream, exchange)
        if source and credential and await _token_was_dead(upstream, exchange, source, credential):
            upstream.close()  # its body was not read: the connection is not reused
            credential = exchange.credential = await credential_for(source, route, exchange.context.metrics)
            upstream = exchange.upstream = await _send_git(exchange, credential, body)
        _check_status(upstream, route, credential)
        if upstream.status == 403 and source and credential and route.service is Service.RECEIVE_PACK:
            await _explain_push_refusal(source, credential, route)
        return Opened(upstream, credential, _response_headers(upstream, route))
    except BaseException:
        upstream.close()
        raise


async def credential_for(source: CredentialSource | None, route: Route, metrics: Metrics) -> Credential | None:
    if source is None:
        return None
    credential = await source.get_credential(route.repo)
    if credential.origin == "cached":
        metrics.cache_hits.labels(source.entry_id).inc()
    elif credential.origin == "minted":
        metrics.cache_misses.labels(source.entry_id).inc()
    return credential


async def credential_or_fallback(exchange: Exchange) -> Credential | None:
    """The entry's credential; or, when its GitHub App is not installed on the owner (a public dependency under a
    catch-all entry), none at all for a read the upstream allows anonymously: upstream then decides, as for a
    direct clone. Pushes never fall back. The "not installed" answer is remembered by the source, so the
    fallback costs no further look-ups."""
    route = exchange.routed
    try:
        return await credential_for(exchange.source, route, exchange.context.metrics)
    except AppNotInstalled as not_installed:
        if not route.upstream.anonymous or is_write(route, exchange.request.method):
            raise
        exchange.fallback = not_installed
        return None


async def _send_git(
    exchange: Exchange, credential: Credential | None, body: bytes | Peeked | PassOn | None
) -> aiohttp.ClientResponse:
    route, context = exchange.routed, exchange.context
    data, length = request_body(exchange, body)
    headers = _upstream_headers(exchange.request.headers, credential, exchange.request_id, length)
    started = time.monotonic()
    response = await send(
        context.session, exchange.request.method, route.url, route.upstream.host, route.upstream, headers, data
    )
    context.metrics.upstream_latency.labels(route.service.value).observe(time.monotonic() - started)
    return response


def _refuse_failed_fallback(upstream: aiohttp.ClientResponse, exchange: Exchange) -> None:
    """Upstream refused the anonymous read too (401; GitHub's 404 for a private repo): the client gets the
    proxy's own reason, "not installed", rather than a bare refusal."""
    if exchange.fallback is None:
        return
    if upstream.status in (401, 403, 404):
        raise exchange.fallback
    exchange.credential_kind = "anonymous"
    entry = exchange.routed.entry
    exchange.context.metrics.anonymous_fallbacks.labels(entry.id if entry else "").inc()


async def _explain_push_refusal(source: CredentialSource, credential: Credential, route: Route) -> None:
    """GitHub answers a push with a token that may not write with a bare `Permission to acme/app denied`; the
    source knows what the token was minted with, and says what is missing and where to grant it."""
    reason = await source.why_push_refused(credential, route.repo)
    if reason is not None:
        raise PushNotPermitted(reason)


def _refuse_if_body_broke(exchange: Exchange) -> None:
    """Upstream may answer before it has the whole body (git http-backend does). If the client's body broke off
    meanwhile, that answer belongs to a request upstream never fully got: it is not passed on."""
    if exchange.upload is Upload.BROKE:
        raise RequestBodyRefused("the request body broke off before it was complete")


async def _token_was_dead(
    upstream: aiohttp.ClientResponse, exchange: Exchange, source: CredentialSource, credential: Credential
) -> bool:
    """Whether to send the request again with a fresh token. A 401 means the token was refused: whatever the
    method, it leaves the cache (LFS is all POSTs). GitHub answers a dead token on a *private* repo with 404, so
    that the repo's existence stays secret: a 404 on info/refs has the source ask GitHub whether the token is
    alive (rate-limited there, not here). Only a request without a body is sent again: GET info/refs, which
    opens every git operation."""
    route, method = exchange.routed, exchange.request.method
    if upstream.status == 401:
        renewable = await source.invalidate(credential, route.repo)
        return renewable and method == "GET"
    if upstream.status == 404 and method == "GET" and route.endpoint is INFO_REFS:
        return await source.recheck_after_not_found(credential, route.repo)
    return False


def request_body(
    exchange: Exchange, inspected: bytes | Peeked | PassOn | None
) -> tuple[bytes | io.BytesIO | AsyncIterator[bytes] | None, int | None]:
    """The body to send and the Content-Length to declare (None: none, or chunked).

    - A body the proxy read whole goes out with the length of exactly those bytes.
    - A streamed body keeps its framing: with the client's Content-Length, which aiohttp's parser framed the
      body by, and which `_streamed` checks against the bytes that really came (a shortfall aborts the upstream
      connection rather than leave it waiting for the rest); or chunked, as the client sent it. A body the proxy
      began to read (a Peeked head, a push's checked prefix) is streamed the same way: what was read first, then
      the rest as it comes.
    The app runs with auto_decompress=False, so these are the bytes git sent, gzip and all."""
    request = exchange.request
    if isinstance(inspected, bytes):
        exchange.bytes_in += len(inspected)
    if isinstance(inspected, Peeked) and inspected.whole:
        inspected = inspected.head  # counted in as it was read (peek_body's progress)
    if isinstance(inspected, bytes):
        exchange.upload = Upload.SENT
        # aiohttp writes a large bytes body in one go, blocking the loop meanwhile; from a BytesIO, in chunks.
        data: bytes | io.BytesIO = io.BytesIO(inspected) if len(inspected) > _ONE_WRITE else inspected
        return data, len(inspected)
    if not request.body_exists:
        exchange.upload = Upload.SENT
        return None, None
    if inspected is None or isinstance(inspected, Peeked):
        return _streamed(exchange, request.content_length, inspected), request.content_length
    return _streamed(exchange, request.content_length, passed=inspected), request.content_length


async def _streamed(
    exchange: Exchange, declared: int | None, peeked: Peeked | None = None, passed: PassOn | None = None
) -> AsyncIterator[bytes]:
    """`peeked`, `passed`: what the proxy read of the body already (counted in then). Once that went on, it is
    released: the bytes stop counting against what bodies may hold together, and nothing here holds them."""
    received = 0
    if peeked is not None:
        peeked.sending = True
    try:
        if peeked is not None:
            received += len(peeked.head)
            if peeked.head:
                yield peeked.head
            peeked.release()
        if passed is not None:
            async for chunk in passed.prefix():
                received += len(chunk)
                yield chunk
        async for chunk in exchange.request.content.iter_any():
            received += len(chunk)
            exchange.bytes_in += len(chunk)
            yield chunk
        if declared is not None and received != declared:
            raise RequestBodyRefused(f"request body ended after {received} of its {declared} bytes")
    except BaseException:
        # aiohttp closes the upstream connection when a body generator raises, but if upstream already answered,
        # the error never reaches the response body being read (and its read timeout is dropped): upstream would
        # wait for the rest of the body, and the proxy for the rest of the answer, for ever. So close it here.
        exchange.upload = Upload.BROKE
        exchange.close_upstream()
        raise
    finally:
        if peeked is not None:
            peeked.release()
        if passed is not None:
            passed.release()
    exchange.upload = Upload.SENT


def _upstream_headers(
    headers: CIMultiDictProxy[str], credential: Credential | None, request_id: str, content_length: int | None
) -> CIMultiDict[str]:
    out = CIMultiDict((name, value) for name, value in headers.items() if name.lower() in FORWARDED_REQUEST_HEADERS)
    out["X-Request-Id"] = request_id
    if content_length is not None:
        out["Content-Length"] = str(content_length)
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


def refuse_control_characters(upstream: aiohttp.ClientResponse, host: str) -> None:
    """aiohttp refuses to write a header value with a control character (it could split the response): an answer
    carrying one is refused with its reason, from GitHub or a storage host alike, rather than crash mid-answer."""
    if any(_CONTROL.search(value) for value in upstream.headers.values()):
        raise UpstreamBadResponse(f"{host} answered with a control character in a header")


def _response_headers(upstream: aiohttp.ClientResponse, route: Route) -> CIMultiDict[str]:
    refuse_control_characters(upstream, route.upstream.host)
    out = CIMultiDict((name, value) for name, value in upstream.headers.items() if name.lower() not in NOT_RETURNED)
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


def finish(upstream: aiohttp.ClientResponse, exchange: Exchange, complete: bool) -> None:
    """A connection goes back to the pool only after a whole request and a whole response. Anything less (a body
    cut short on either side, an answer that came before the request was sent) could leave bytes on it that the
    next request would be read with."""
    if complete and exchange.upload is Upload.SENT:
        upstream.release()
    else:
        upstream.close()


async def drain_or_close(answer: aiohttp.ClientResponse, limit: int) -> None:
    """Read a small answer to its end, so that its connection goes back to the pool; close a larger one."""
    read = 0
    async for chunk in answer.content.iter_any():
        read += len(chunk)
        if read > limit:
            answer.close()
            return


async def upstream_chunks(
    upstream: aiohttp.ClientResponse, exchange: Exchange, where: str
) -> AsyncIterator[tuple[bytes, bool]]:
    """The answer's body as it arrives, for `relay`, each chunk with whether it is the last; aiohttp's failures
    mid-body become the proxy's reasons. After a small read mid-answer, upstream is left unread for a moment
    (`coalesce`), so that the next read takes more."""
    body = upstream.content
    with upstream_errors(where):
        async for chunk in body.iter_any():
            last = body.at_eof()
            yield chunk, last
            if not last:
                pause_after_small_read(upstream, len(chunk), exchange.bytes_out)
