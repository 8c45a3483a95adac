"""Forward: stream one git request to its upstream with the credential added, and the answer back, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .access import AccessControl, Client, enforce_read_only, is_write, read_only_party
from .bodies import HeldBytes, Peeked, inflate_bounded, peek_body, read_whole_body
from .coalesce import pause_after_small_read
from .config import StorageHostConfig
from .credentials import Credential, CredentialSource
from .errors import (
    AnonymousRefused,
    AppNotInstalled,
    AuthenticationRequired,
    BadRequestPath,
    BrowserRequestRefused,
    ClientForbidden,
    CredentialError,
    GitHubRefused,
    GitHubUnavailable,
    HealSuspended,
    HostNotAllowed,
    InstallationGone,
    JwtRejected,
    MalformedAnswer,
    MethodNotAllowed,
    MisdirectedRequest,
    NotAGitEndpoint,
    ProxyBusy,
    ProxyError,
    PushNotPermitted,
    RateLimited,
    ReadOnlyRefused,
    RequestBodyRefused,
    UpstreamBadRedirect,
    UpstreamBadResponse,
    UpstreamNeedsAuth,
    UpstreamRefusedAuth,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .guards import check_host, refuse_absolute_form, refuse_browsers
from .lfs import (
    DigestCheck,
    HandleRefused,
    HandleStore,
    LfsPolicy,
    StorageAction,
    StorageRefused,
    read_batch_answer,
    rewrite_batch_answer,
    storage_request_headers,
    storage_url,
)
from .logs import REQUEST_ID, sanitise_for_client
from .metrics import REFUSED, Metrics
from .routing import INFO_REFS, LFS_BATCH, UPLOAD_PACK, Route, Router, Service

if TYPE_CHECKING:  # the mirror package is loaded by app.build_mirror, for mirror.dir only
    from .mirror import Mirror, MirrorAnswer
    from .mirror.proof import AuthProof

log = logging.getLogger("git_token_proxy.forward")
audit_log = logging.getLogger("git_token_proxy.audit")

# What upstream receives is built by the proxy. Of the client's headers only these pass: git's and LFS's own, and
# the caches' advice. Everything else (hop-by-hop headers, Host, Expect, Transfer-Encoding, the client's own
# Authorization and Cookie, X-Forwarded-*, whatever a hostile process invents) stays here. Content-Length is set by
# the proxy from a length it verifies, and X-Request-Id is the proxy's own (sanitised) id.
_FORWARDED_REQUEST_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "content-type", "content-encoding", "git-protocol",
     "user-agent", "pragma", "cache-control"}
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
    RequestBodyRefused: 400,
    MisdirectedRequest: 421,
    NotAGitEndpoint: 404,
    HandleRefused: 404,
    MethodNotAllowed: 405,
    HostNotAllowed: 403,
    AnonymousRefused: 403,
    AuthenticationRequired: 401,
    ClientForbidden: 403,
    ReadOnlyRefused: 403,
    PushNotPermitted: 403,
    ProxyBusy: 503,
    BrowserRequestRefused: 403,
    UpstreamNeedsAuth: 403,
    AppNotInstalled: 403,
    CredentialError: 502,  # anything else a token source cannot overcome
    JwtRejected: 502,
    GitHubRefused: 502,
    MalformedAnswer: 502,
    InstallationGone: 502,
    HealSuspended: 502,
    RateLimited: 503,
    GitHubUnavailable: 503,
    UpstreamRefusedAuth: 502,
    UpstreamUnreachable: 502,
    UpstreamBadRedirect: 502,
    UpstreamBadResponse: 502,
    StorageRefused: 502,
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
    allowed_hosts: frozenset[str] = frozenset()  # Host header values besides loopback names (lower case)
    body_timeout: float = 15.0  # for bodies the proxy reads whole in order to check them
    mirror: Mirror | None = None  # mirror.dir: pack requests may be answered from a local mirror
    proof: AuthProof | None = None  # with a mirror: upstream's recent word that a credential may read a repo
    lfs: LfsPolicy | None = None  # lfs.proxyObjects: LFS objects go through the proxy, under handles
    held_bodies: HeldBytes | None = None  # with a mirror: what all pack requests together may hold in memory


@dataclass
class LiveContext:
    """A reload replaces `current` in one assignment; a request keeps the context it started with to its end."""

    current: ForwardContext
    transfers: TransferWatch
    lfs_handles: HandleStore = field(default_factory=HandleStore)  # outlive reloads, like the transfers they name
    # Upstream connections that requests with a body still arriving may hold at once: the rest of the pool stays
    # for everyone else (an info/refs, a body already here), so that slow pushes cannot starve every clone.
    body_slots: asyncio.Semaphore | None = None
    body_slots_per_client: int = 1
    _client_slots: dict[str, asyncio.Semaphore] = field(default_factory=dict)  # by access client (config-bounded)

    def client_slots(self, client: str) -> asyncio.Semaphore:
        """One client's share of the body slots."""
        if client not in self._client_slots:
            self._client_slots[client] = asyncio.Semaphore(self.body_slots_per_client)
        return self._client_slots[client]


FORWARD_CONTEXT = web.AppKey("forward_context", LiveContext)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in header values


@dataclass(eq=False)  # identity: the transfer watch keys on it
class _Exchange:
    """One request as the audit log reports it, filled in as it moves along the data path."""

    started: float
    request_id: str
    route: Route | None = None
    client: str | None = None
    credential: Credential | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0  # counted per chunk: the transfer watch reads it to see whether the client still reads
    reason: str | None = None  # why the proxy refused the request
    aborted: str | None = None  # why a transfer already under way was cut
    request_sent: bool = False  # upstream received the whole request body (or there was none)
    mirror: str | None = None  # with a mirror, for pack requests: hit, filled or bypass
    answering: bool = False  # the response has started (upstream's or the mirror's)
    body_failed: bool = False  # the client's streamed body broke off
    upstream: aiohttp.ClientResponse | None = None  # once its headers have come
    lfs: StorageAction | None = None  # an /_lfs/ request: the object it moves
    fallback: AppNotInstalled | None = None  # the app is not installed: the read went upstream without a token
    credential_kind: str | None = None  # "anonymous" once such a read was answered
    answered: bool = False  # a whole answer went out (upstream's, the mirror's, or the proxy's own refusal)
    cut_by: str | None = None  # who ended a transfer early: "client", "upstream" or "proxy" (a bug)

    def count_in(self, size: int) -> None:
        self.bytes_in += size

    def cut(self, side: str) -> None:
        """The first side to break a transfer is the one that cut it (an abort that follows is its consequence)."""
        if self.cut_by is None:
            self.cut_by = side

    @property
    def complete(self) -> bool:
        return self.answered and self.cut_by is None and not self.body_failed

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()


# ---------------------------------------------------------------- the transfer watch


@dataclass(eq=False)
class _Watched:
    exchange: _Exchange
    transport: asyncio.Transport
    streams_body: bool  # the client sends a body that the proxy streams (rather than one already read)
    seen: tuple[int, int] = (-1, -1)  # bytes in, bytes out at the last sweep
    progress_at: float = field(default_factory=time.monotonic)
    window: tuple[float, int] = (-1.0, 0)  # (since, bytes in then): the body rate is judged over this window


BODY_RATE_WINDOW = 30.0


class TransferWatch:
    """Cuts transfers whose client went quiet: one that stops sending its request body, or stops reading its
    answer, while keeping the connection open. Either would otherwise hold an upstream connection (of a capped
    pool) for ever. Nothing is done per chunk but the byte counts the audit line needs anyway: a periodic sweep
    compares them, so a fast clone pays no timer."""

    def __init__(self, write_timeout: float, metrics: Metrics, min_body_rate: float = 0.0) -> None:
        self.write_timeout = write_timeout
        self.min_body_rate = min_body_rate  # bytes/s a request body must average while it arrives (0: no floor)
        self._metrics = metrics
        self._active: dict[_Exchange, _Watched] = {}

    @property
    def rate_window(self) -> float:
        """The span a body's rate is judged over: long enough for a pause, short enough that a client dripping a
        byte now and then (never quiet for writeTimeout) lets go of its upstream connection within it."""
        return min(BODY_RATE_WINDOW, self.write_timeout)

    @property
    def sweep_interval(self) -> float:
        return max(0.05, min(self.write_timeout / 4, 15.0))

    def add(self, exchange: _Exchange, transport: asyncio.Transport, streams_body: bool) -> None:
        self._active[exchange] = _Watched(exchange, transport, streams_body)

    def remove(self, exchange: _Exchange) -> None:
        self._active.pop(exchange, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.sweep(time.monotonic())
            except Exception:  # the watch must outlive any bug in one sweep
                log.exception("transfer watch: sweep failed")

    def sweep(self, now: float) -> None:
        for watched in list(self._active.values()):
            exchange = watched.exchange
            counts = (exchange.bytes_in, exchange.bytes_out)
            if self._body_too_slow(watched, now):
                self._cut(watched, f"the request body arrived slower than {self.min_body_rate:.0f} bytes/s over "
                                   f"{self.rate_window:.0f} s (server.minBodyRate)")  # fmt: skip
            elif counts != watched.seen or not self._client_holds_it_up(watched):
                watched.seen, watched.progress_at = counts, now
            elif now - watched.progress_at >= self.write_timeout:
                self._cut(watched, f"the client went quiet for {self.write_timeout:.0f} s (server.writeTimeout)")

    def _body_too_slow(self, watched: _Watched, now: float) -> bool:
        """Judged window by window while the body still arrives; a body that has arrived is not judged."""
        exchange = watched.exchange
        if not (self.min_body_rate and watched.streams_body) or exchange.request_sent or exchange.answering:
            return False
        since, bytes_then = watched.window
        if since < 0:
            watched.window = (now, exchange.bytes_in)
            return False
        if now - since < self.rate_window:
            return False
        watched.window = (now, exchange.bytes_in)
        return (exchange.bytes_in - bytes_then) / (now - since) < self.min_body_rate

    @staticmethod
    def _client_holds_it_up(watched: _Watched) -> bool:
        """Before the answer: the client owes body bytes. During it: bytes wait for the client to read them.
        Otherwise it is upstream (or the mirror's fill) that is slow, and its own timeouts are the judge."""
        if watched.exchange.answering:
            return watched.transport.get_write_buffer_size() > 0
        return watched.streams_body and not watched.exchange.request_sent

    def _cut(self, watched: _Watched, why: str) -> None:
        exchange = watched.exchange
        self.remove(exchange)
        exchange.aborted = why
        exchange.cut("client")
        log.warning(
            "request %s: aborting the transfer after %d bytes in, %d out: %s",
            exchange.request_id, exchange.bytes_in, exchange.bytes_out, exchange.aborted,
        )  # fmt: skip
        self._metrics.write_stalls.inc()
        exchange.close_upstream()  # never back to the pool: the exchange did not complete
        watched.transport.abort()


async def forward_request(request: web.Request) -> web.StreamResponse:
    async def serve(context: ForwardContext, live: LiveContext, exchange: _Exchange) -> web.StreamResponse:
        return await _forward(request, context, live, exchange)

    return await _at_the_edge(request, serve)


async def _at_the_edge(
    request: web.Request,
    serve: Callable[[ForwardContext, LiveContext, _Exchange], Awaitable[web.StreamResponse]],
    what: str | None = None,
) -> web.StreamResponse:
    """Every request's frame: its id on each log line, the in-flight gauge, its metrics and audit line, and a
    reasoned 500 for a bug. `what` names it in that 500's log line (by default its method and path)."""
    live = request.app[FORWARD_CONTEXT]
    context = live.current
    exchange = _Exchange(time.monotonic(), _request_id(request))
    REQUEST_ID.set(exchange.request_id)  # every log line of this request (and of a mint it starts) carries it
    context.metrics.in_flight.inc()
    try:
        return await serve(context, live, exchange)
    except Exception:
        # A bug, or something no one thought of: one log line with the traceback, a reasoned 500 for git, and a
        # metric and an audit line that say so, instead of aiohttp's bare 500 without a request id.
        what = what or f"{request.method} {request.raw_path.partition('?')[0][:200]}"
        log.exception("unexpected error while serving %s", what)
        context.metrics.unexpected_errors.inc()
        return _refuse_unexpected(exchange)
    finally:
        context.metrics.in_flight.dec()
        _record(context.metrics, exchange)
        _audit(request, exchange)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)


async def _forward(
    request: web.Request, context: ForwardContext, live: LiveContext, exchange: _Exchange
) -> web.StreamResponse:
    path, _, query = request.raw_path.partition("?")  # raw: the router checks the bytes git actually sent
    try:
        refuse_absolute_form(request)
        refuse_browsers(request.headers)
        check_host(request, context.allowed_hosts)
        client = context.access.authenticate(request.headers.get("Authorization"))
        exchange.client = client.name if client else None
        exchange.route = route = context.router.resolve_route(request.method, path, query)
        # Who may do what is settled before a token is fetched: a refused push never costs a mint.
        context.access.authorize(client, route)
        _refuse_body_on_get(request)
        body = await enforce_read_only(request, route, client, context.body_timeout)
    except ProxyError as error:
        return _refuse(error, exchange)
    streams_body = request.body_exists and body is None
    # The slot first: waiting for one is the proxy's doing, and no client is judged for it.
    try:
        async with _body_slot(live, request, streams_body, exchange.client):
            with _watched(live, request, exchange, streams_body):
                return await _exchange_with_upstream(request, route, context, exchange, body, live.lfs_handles)
    except ProxyBusy as error:
        return _refuse(error, exchange)


@contextlib.contextmanager
def _watched(live: LiveContext, request: web.Request, exchange: _Exchange, streams_body: bool) -> Iterator[None]:
    if request.transport is not None:
        live.transfers.add(exchange, request.transport, streams_body=streams_body)
    try:
        yield
    finally:
        live.transfers.remove(exchange)


# A request whose body is still arriving waits this long for a body slot, then gets a 503 with the reason: never a
# push left hanging without a word.
BODY_SLOT_WAIT = 30.0


@contextlib.asynccontextmanager
async def _body_slot(
    live: LiveContext, request: web.Request, streams_body: bool, client: str | None
) -> AsyncIterator[None]:
    """A request whose body is still arriving takes one of the body slots for its exchange, and, with access
    control on, one of its client's share (half of them), so that one client's slow bodies cannot take every
    slot from the others. A body that has all arrived already (every small POST: ls-refs, a fetch's wants)
    needs none. ProxyBusy when none comes free within BODY_SLOT_WAIT."""
    if live.body_slots is None or not streams_body or request.content.is_eof():
        yield
        return
    async with contextlib.AsyncExitStack() as held:
        semaphores = [live.body_slots] if client is None else [live.client_slots(client), live.body_slots]
        for semaphore in semaphores:
            try:
                async with asyncio.timeout(BODY_SLOT_WAIT):
                    await semaphore.acquire()
            except TimeoutError:
                raise ProxyBusy(
                    "every upstream connection for request bodies still arriving is taken "
                    f"(server.maxUpstreamConnections) after {BODY_SLOT_WAIT:.0f} s; try again"
                ) from None
            held.callback(semaphore.release)
        yield


async def _exchange_with_upstream(
    request: web.Request, route: Route, context: ForwardContext, exchange: _Exchange, body: bytes | Peeked | None,
    handles: HandleStore,
) -> web.StreamResponse:  # fmt: skip
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
            served = await _serve_from_mirror(request, route, context, exchange, peeked)
            if served is not None:
                return served
            body = peeked  # bypass: exactly the bytes the client sent, the rest following as it comes
        opened = await _open_upstream(request, route, context, exchange, body)
    except ProxyError as error:
        _note_for_mirror(context, route, error)
        if isinstance(error, AppNotInstalled) and route.entry is not None:
            context.metrics.mint_failed(route.entry.id, error)  # a refusal; a public repo read anyway is none
        return _refuse(error, exchange)
    finally:
        if peeked is not None:
            peeked.release()  # the budget counts a held body until its exchange is over, which is on the safe side
    _note_for_mirror(context, route, opened.upstream.status)
    if route.endpoint is LFS_BATCH and context.lfs is not None and opened.upstream.status == 200:
        return await _answer_batch(request, route, context, exchange, opened, handles)
    complete = False
    try:
        # No reason phrase from upstream: it may hold control characters, and git reads only the status code.
        response = web.StreamResponse(status=opened.upstream.status, headers=opened.headers)
        response.headers["X-Request-Id"] = exchange.request_id
        exchange.status = response.status
        complete = await _stream_back(request, opened.upstream, response, exchange)
    finally:
        _finish(opened.upstream, complete and exchange.request_sent)
        if exchange.mirror is not None:  # a pack request the mirror did not answer: it came from upstream
            context.metrics.mirror_bytes.labels("upstream").inc(exchange.bytes_out)
    return response


# ---------------------------------------------------------------- the mirror

# A pack request lists wants and haves: even a fetch into a large clone stays far below this. A larger declared
# body goes upstream as usual, streamed.
MIRROR_BODY_LIMIT = 16 * 1024 * 1024


async def _serve_from_mirror(
    request: web.Request, route: Route, context: ForwardContext, exchange: _Exchange, peeked: Peeked
) -> web.StreamResponse | None:
    """A pack from the mirror, or None: the request goes upstream instead (a bypass). Refs and the right to read
    come from upstream every time: this runs only for the pack request, after access control, and only while
    upstream's recent answer proves that the credential can read the repo. A body the proxy could not hold
    whole (too long, too slow, or past what all requests together may hold) is a bypass too."""
    from .mirror import is_pack_request  # loaded already: context.mirror exists

    assert context.mirror is not None
    if not peeked.whole:
        exchange.mirror = "bypass"
        context.metrics.mirror_requests.labels("bypass").inc()
        return None
    raw = peeked.head
    exchange.request_sent = True  # the client owes nothing more: a long fill is not a client gone quiet
    # git gzips requests over 1 KiB; upload-pack reads them inflated.
    body = inflate_bounded(raw, request.headers.get("Content-Encoding"), MIRROR_BODY_LIMIT)
    if body is not None and not await asyncio.to_thread(is_pack_request, body):
        return None  # ls-refs: the refs are upstream's, at this moment, like info/refs
    exchange.mirror = "bypass"
    source = context.sources[route.entry.id] if route.entry else None
    credential = exchange.credential = await _credential_or_fallback(source, route, request, context, exchange)
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
    exchange.mirror, exchange.request_sent = answer.outcome, True
    return await _stream_mirror_answer(request, answer, exchange, context.metrics)


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
        async with context.session.get(
            f"{route.repo_url}/info/refs?service=git-upload-pack", headers=headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(sock_connect=route.upstream.connect_timeout,
                                          sock_read=route.upstream.read_timeout),
        ) as answer:  # fmt: skip
            status = answer.status
            await _drain_or_close(answer, PROOF_READ_LIMIT)
    except (aiohttp.ClientError, TimeoutError):
        return False  # no word from upstream: the request goes there, and gets upstream's own answer
    context.proof.note(entry_id, route.matched, status)
    return context.proof.holds(entry_id, route.matched)


# Only the status of the probe matters. A v2 ref advertisement is its capabilities, a few hundred bytes; an answer
# that goes on past this is not read into memory (a hostile 400 MiB one once took RSS from 75 to 898 MiB).
PROOF_READ_LIMIT = 64 * 1024


async def _drain_or_close(answer: aiohttp.ClientResponse, limit: int) -> None:
    """Read a small answer to its end, so that its connection goes back to the pool; close a larger one."""
    read = 0
    async for chunk in answer.content.iter_any():
        read += len(chunk)
        if read > limit:
            answer.close()
            return


def _note_for_mirror(context: ForwardContext, route: Route, outcome: int | ProxyError) -> None:
    """Every upstream answer to a read of a mirrored repo renews or voids the proof."""
    if context.proof is None or route.service is not Service.UPLOAD_PACK:
        return
    if isinstance(outcome, UpstreamRefusedAuth | UpstreamNeedsAuth):
        outcome = 401
    if isinstance(outcome, int):
        context.proof.note(route.entry.id if route.entry else None, route.matched, outcome)


async def _stream_mirror_answer(
    request: web.Request, answer: MirrorAnswer, exchange: _Exchange, metrics: Metrics
) -> web.StreamResponse:
    headers = {"Content-Type": "application/x-git-upload-pack-result", "Cache-Control": "no-cache",
               "X-Request-Id": exchange.request_id}  # fmt: skip
    response = web.StreamResponse(status=200, headers=headers)
    exchange.status = 200
    try:
        await response.prepare(request)
        exchange.answering = True
        async for chunk in answer.chunks:
            await response.write(chunk)
            exchange.bytes_out += len(chunk)
        await response.write_eof()
        exchange.answered = True
    except ConnectionError:  # aiohttp's "Connection lost" too: a client that hung up, or was cut for stalling
        exchange.cut("client")
        if not exchange.aborted:
            log.info("client closed the connection after %d bytes from the mirror", exchange.bytes_out)
    except Exception:
        # The status line is out: git must see a broken transfer, never a truncated pack taken for a whole one.
        log.exception("mirror answer failed after %d bytes; aborting the client connection", exchange.bytes_out)
        exchange.aborted = "the mirror's upload-pack failed (see the proxy's log)"
        exchange.cut("upstream")  # the mirror stands in for upstream here
        _abort_client(request)
    finally:
        await answer.close()
        metrics.mirror_bytes.labels("mirror").inc(exchange.bytes_out)
    return response


# ---------------------------------------------------------------- LFS objects (lfs.proxyObjects)

# A verify request is `{"oid": ..., "size": ...}`.
LFS_VERIFY_BODY_LIMIT = 64 * 1024
# What goes back with a rewritten batch answer: it is a new body, so its framing and encoding are the proxy's own.
_NOT_RETURNED_WITH_BATCH = frozenset({"content-length", "content-encoding", "etag", "content-md5"})


async def _answer_batch(
    request: web.Request, route: Route, context: ForwardContext, exchange: _Exchange, opened: _Opened,
    handles: HandleStore,
) -> web.StreamResponse:  # fmt: skip
    """The batch answer, read whole (bounded) and rewritten so that storage actions point at this proxy."""
    assert context.lfs is not None
    upstream = opened.upstream
    try:
        try:
            raw = await read_batch_answer(upstream)
        except (aiohttp.ClientError, TimeoutError):
            raise UpstreamUnreachable(f"{route.upstream.host} broke off its LFS batch answer") from None
        # The Host the client used (already checked): the address under which it reaches this proxy.
        rewritten = rewrite_batch_answer(raw, context.lfs, handles, route, exchange.client, f"http://{request.host}")
    except ProxyError as error:
        upstream.close()
        return _refuse(error, exchange)
    _finish(upstream, exchange.request_sent)
    for action, count in rewritten.rewritten.items():
        context.metrics.lfs_actions_rewritten.labels(action).inc(count)
    context.metrics.lfs_actions_passed.inc(rewritten.passed)
    _note_dropped_headers(route, rewritten.dropped, context.lfs, context.metrics)
    headers = CIMultiDict((k, v) for k, v in opened.headers.items() if k.lower() not in _NOT_RETURNED_WITH_BATCH)
    headers["X-Request-Id"] = exchange.request_id
    exchange.status, exchange.bytes_out, exchange.answered = upstream.status, len(rewritten.body), True
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

    async def serve(context: ForwardContext, live: LiveContext, exchange: _Exchange) -> web.StreamResponse:
        return await _serve_lfs_object(request, context, live, exchange)

    return await _at_the_edge(request, serve, what="an LFS object")  # its path is a handle: never in a log line


async def _serve_lfs_object(
    request: web.Request, context: ForwardContext, live: LiveContext, exchange: _Exchange
) -> web.StreamResponse:
    try:
        refuse_browsers(request.headers)
        check_host(request, context.allowed_hosts)
        client = context.access.authenticate(request.headers.get("Authorization"))
        exchange.client = client.name if client else None
        if context.lfs is None:
            raise HandleRefused("LFS objects are not served by this proxy (lfs.proxyObjects is off)")
        action = exchange.lfs = live.lfs_handles.find(request.match_info["handle"], exchange.client)
        exchange.route = action.route
        if request.method != action.method:
            raise MethodNotAllowed(f"{request.method} is not allowed on this LFS {action.action} handle")
        context.access.authorize(client, action.route)  # the rules of now, not of the batch request's time
        if action.method != "GET":
            _refuse_lfs_write(client, action, context.router)
        storage = context.lfs.storage_hosts.get(action.storage_host)
        if storage is None:
            raise HandleRefused(f"storage host {action.storage_host} is no longer in lfs.storageHosts")
        _refuse_body_on_get(request)
        body = await _lfs_request_body(request, action, context.body_timeout)
    except ProxyError as error:
        return _refuse(error, exchange)
    uploads = action.method == "PUT"
    try:
        async with _body_slot(live, request, uploads, exchange.client):
            with _watched(live, request, exchange, uploads):
                return await _exchange_with_storage(request, context, exchange, action, storage, body)
    except ProxyBusy as error:
        return _refuse(error, exchange)


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
    request: web.Request, context: ForwardContext, exchange: _Exchange, action: StorageAction,
    storage: StorageHostConfig, body: bytes | None,
) -> web.StreamResponse:  # fmt: skip
    try:
        upstream = exchange.upstream = await _send_to_storage(request, context, exchange, action, storage, body)
        try:
            _refuse_if_body_broke(exchange)
            if not 200 <= upstream.status < 300:
                raise StorageRefused(f"storage host {action.storage_host} answered HTTP {upstream.status}")
            _refuse_control_characters(upstream, f"storage host {action.storage_host}")
        except BaseException:
            upstream.close()
            raise
    except ProxyError as error:
        return _refuse(error, exchange)
    complete = False
    try:
        headers = {"X-Request-Id": exchange.request_id}
        if "Content-Type" in upstream.headers:
            headers["Content-Type"] = upstream.headers["Content-Type"]
        response = web.StreamResponse(status=upstream.status, headers=headers)
        exchange.status = response.status
        if action.method == "GET":
            response.content_length = action.size
            complete = await _stream_verified(request, upstream, response, exchange, action, context.metrics)
        else:
            complete = await _stream_back(request, upstream, response, exchange)
    finally:
        _finish(upstream, complete and exchange.request_sent)
    return response


async def _send_to_storage(
    request: web.Request, context: ForwardContext, exchange: _Exchange, action: StorageAction,
    storage: StorageHostConfig, body: bytes | None,
) -> aiohttp.ClientResponse:  # fmt: skip
    """The request to storage is built by `storage_request_headers`: never a token of ours, nor anything else of
    the client's than its upload's type, nor any framing from the batch answer."""
    data, length = _request_body(request, exchange, body)
    content_type = request.headers.get("Content-Type") if action.method != "GET" else None
    headers = storage_request_headers(action, content_type, length)
    try:
        return await context.session.request(
            action.method, storage_url(action, storage), headers=headers, data=data,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=storage.connect_timeout,
                                          sock_read=storage.read_timeout),
            allow_redirects=False,  # a redirect is a non-2xx answer: refused, never followed
        )  # fmt: skip
    except TimeoutError:
        raise UpstreamTimeout(f"storage host {action.storage_host} did not answer in time") from None
    except aiohttp.ClientConnectorError as error:
        raise UpstreamUnreachable(f"cannot connect to storage host {action.storage_host}: {error.strerror}") from None
    except aiohttp.ClientError as error:
        reason = type(error).__name__
        raise UpstreamUnreachable(f"request to storage host {action.storage_host} failed: {reason}") from None


async def _stream_verified(
    request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse, exchange: _Exchange,
    action: StorageAction, metrics: Metrics,
) -> bool:  # fmt: skip
    """Like `_stream_back`, but one chunk behind: the last chunk is written only once the whole object hashed to
    its oid, so a client never holds all the bytes of a wrong object. On a mismatch the connection is aborted,
    never ended cleanly: git-lfs sees a broken download, not a corrupt file."""
    await response.prepare(request)
    exchange.answering = True
    check, held = DigestCheck(action.oid, action.size), b""
    try:
        async for chunk in upstream.content.iter_any():
            if not check.update(chunk):
                break
            if held:
                await response.write(held)
                exchange.bytes_out += len(held)
            pause_after_small_read(upstream, len(chunk), check.received)
            held = chunk
        if check.matches():
            await response.write(held)
            exchange.bytes_out += len(held)
            await response.write_eof()
            exchange.answered = True
            return True
        metrics.lfs_digest_mismatches.inc()
        exchange.cut("upstream")
        exchange.aborted = f"the object from storage did not match its oid ({check.received} bytes read)"
        log.warning("LFS object %s from %s: %s; aborting the client connection", action.oid[:16],
                    action.storage_host, exchange.aborted)  # fmt: skip
        _abort_client(request)
    except ConnectionError:
        exchange.cut("client")
        if not exchange.aborted:
            log.info("client closed the connection after %d bytes of an LFS object", exchange.bytes_out)
    except (aiohttp.ClientError, TimeoutError) as error:
        exchange.cut("upstream")
        if not exchange.aborted:
            log.warning("storage failed after %d bytes (%s); aborting the client connection",
                        exchange.bytes_out, type(error).__name__)  # fmt: skip
            _abort_client(request)
    return False


def _finish(upstream: aiohttp.ClientResponse, fully_exchanged: bool) -> None:
    """A connection goes back to the pool only after a whole request and a whole response. Anything less (a body
    cut short on either side, an answer that came before the request was sent) could leave bytes on it that the
    next request would be read with."""
    if fully_exchanged:
        upstream.release()
    else:
        upstream.close()


def _refuse_body_on_get(request: web.Request) -> None:
    """git never sends a body with a GET. One that came with a body could only be an attempt to have the proxy
    put two requests on one upstream exchange (and a GET may be sent twice, after a token was renewed)."""
    if request.method == "GET" and request.body_exists:
        raise BadRequestPath("a GET request must not carry a body")


@dataclass(frozen=True)
class _Opened:
    upstream: aiohttp.ClientResponse
    credential: Credential | None
    headers: CIMultiDict[str]  # what goes back to git


async def _open_upstream(
    request: web.Request, route: Route, context: ForwardContext, exchange: _Exchange, body: bytes | Peeked | None
) -> _Opened:
    """Send the request upstream; a dead token on a replayable request gets one fresh credential and one retry."""
    source = context.sources[route.entry.id] if route.entry else None
    credential = exchange.credential = await _credential_or_fallback(source, route, request, context, exchange)
    upstream = exchange.upstream = await _send(request, route, credential, context, exchange, body)
    try:
        _refuse_if_body_broke(exchange)
        _refuse_failed_fallback(upstream, exchange, context.metrics)
        if source and credential and await _token_was_dead(upstream, request, route, source, credential):
            upstream.close()  # its body was not read: the connection is not reused
            credential = exchange.credential = await _credential(source, route, context.metrics)
            upstream = exchange.upstream = await _send(request, route, credential, context, exchange, body)
        _check_status(upstream, route, credential)
        if upstream.status == 403 and source and credential and route.service is Service.RECEIVE_PACK:
            await _explain_push_refusal(source, credential, route)
        return _Opened(upstream, credential, _response_headers(upstream, route))
    except BaseException:
        upstream.close()
        raise


async def _credential_or_fallback(
    source: CredentialSource | None, route: Route, request: web.Request, context: ForwardContext, exchange: _Exchange
) -> Credential | None:
    """The entry's credential; or, when its GitHub App is not installed on the owner (a public dependency under a
    catch-all entry), none at all for a read the upstream allows anonymously: upstream then decides, as for a
    direct clone. Pushes never fall back. The "not installed" answer is remembered by the source, so the
    fallback costs no further look-ups."""
    try:
        return await _credential(source, route, context.metrics)
    except AppNotInstalled as not_installed:
        if not route.upstream.anonymous or is_write(route, request.method):
            raise
        exchange.fallback = not_installed
        return None


def _refuse_failed_fallback(upstream: aiohttp.ClientResponse, exchange: _Exchange, metrics: Metrics) -> None:
    """Upstream refused the anonymous read too (401; GitHub's 404 for a private repo): the client gets the
    proxy's own reason, "not installed", rather than a bare refusal."""
    if exchange.fallback is None:
        return
    if upstream.status in (401, 403, 404):
        raise exchange.fallback
    exchange.credential_kind = "anonymous"
    metrics.anonymous_fallbacks.labels(exchange.route.entry.id if exchange.route and exchange.route.entry else "").inc()


async def _explain_push_refusal(source: CredentialSource, credential: Credential, route: Route) -> None:
    """GitHub answers a push with a token that may not write with a bare `Permission to acme/app denied`; the
    source knows what the token was minted with, and says what is missing and where to grant it."""
    reason = await source.why_push_refused(credential, route.repo)
    if reason is not None:
        raise PushNotPermitted(reason)


def _refuse_if_body_broke(exchange: _Exchange) -> None:
    """Upstream may answer before it has the whole body (git http-backend does). If the client's body broke off
    meanwhile, that answer belongs to a request upstream never fully got: it is not passed on."""
    if exchange.body_failed:
        raise RequestBodyRefused("the request body broke off before it was complete")


async def _token_was_dead(
    upstream: aiohttp.ClientResponse, request: web.Request, route: Route, source: CredentialSource,
    credential: Credential,
) -> bool:  # fmt: skip
    """Whether to send the request again with a fresh token. A 401 means the token was refused: whatever the
    method, it leaves the cache (LFS is all POSTs). GitHub answers a dead token on a *private* repo with 404, so
    that the repo's existence stays secret: a 404 on info/refs has the source ask GitHub whether the token is
    alive (rate-limited there, not here). Only a request without a body is sent again: GET info/refs, which
    opens every git operation."""
    if upstream.status == 401:
        renewable = await source.invalidate(credential, route.repo)
        return renewable and request.method == "GET"
    if upstream.status == 404 and request.method == "GET" and route.endpoint is INFO_REFS:
        return await source.recheck_after_not_found(credential, route.repo)
    return False


async def _stream_back(
    request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse, exchange: _Exchange
) -> bool:
    """Copy the body as it arrives; memory holds one chunk at a time whatever the repo size. True when the whole
    response reached the client.

    The status line goes out before the body is read, as upstream sent it: a connection that dies with no byte of
    an answer is one that git's libcurl takes for a stale keep-alive and sends the request on again (a push twice)."""
    await response.prepare(request)
    exchange.answering = True
    body = upstream.content
    # When upstream's last chunk came with its terminator, both go out in one send. Only for a chunked answer:
    # aiohttp's write_eof does not hold a body to its Content-Length the way write does.
    chunked = response.content_length is None
    try:
        async for chunk in body.iter_any():
            if chunked and body.at_eof():
                await response.write_eof(chunk)
            else:
                await response.write(chunk)
                pause_after_small_read(upstream, len(chunk), exchange.bytes_out)
            exchange.bytes_out += len(chunk)
        await response.write_eof()  # a no-op when the last chunk has ended the answer already
        exchange.answered = True
        return True
    # ConnectionError first: aiohttp's ClientConnectionResetError is also a ClientError, and a client that hangs
    # up mid-clone (Ctrl-C), or is cut for going quiet, is routine, not an upstream failure worth a traceback.
    except ConnectionError:
        exchange.cut("client")
        if not exchange.aborted:
            log.info("client closed the connection after %d bytes", exchange.bytes_out)
    except (aiohttp.ClientError, TimeoutError) as error:
        exchange.cut("upstream")
        if not exchange.aborted:
            # The status line is already out. Ending the body cleanly would let git take a truncated pack for a
            # complete one, so the connection is aborted and git reports the failure.
            log.warning(
                "upstream failed after %d bytes (%s); aborting the client connection",
                exchange.bytes_out, type(error).__name__,
            )  # fmt: skip
            _abort_client(request)
    except Exception:
        # The status line is out, so no 500 can follow: the failure is logged once and git sees a broken transfer.
        log.exception("unexpected error after %d bytes; aborting the client connection", exchange.bytes_out)
        exchange.aborted = "internal error (see the proxy's log)"
        exchange.cut("proxy")
        _abort_client(request)
    return False


def _abort_client(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _refuse(error: ProxyError, exchange: _Exchange) -> web.Response:
    # Whatever a message quotes (a path, GitHub's own words) is capped, stripped of control characters and
    # redacted before git prints it to a terminal: logs are not the only place a secret could surface.
    exchange.status, exchange.reason = status_for(error), sanitise_for_client(str(error))
    exchange.answered = True  # the refusal is the whole answer
    headers = {"X-Request-Id": exchange.request_id}
    if exchange.status == 401:  # only access control's own challenge may make git ask for a password
        headers["WWW-Authenticate"] = 'Basic realm="git-token-proxy"'
    # text/plain: git prints each line as `remote: ...`.
    return web.Response(status=exchange.status, text=f"{exchange.reason}\n", content_type="text/plain", headers=headers)


def _refuse_unexpected(exchange: _Exchange) -> web.Response:
    exchange.status, exchange.reason = 500, "internal error (see the proxy's log)"
    exchange.answered = True
    text = f"git-token-proxy: internal error; its log has the details under request id {exchange.request_id}\n"
    return web.Response(status=500, text=text, content_type="text/plain", headers={"X-Request-Id": exchange.request_id})


def _record(metrics: Metrics, exchange: _Exchange) -> None:
    if not exchange.complete:
        metrics.transfers_cut.labels(exchange.cut_by or ("client" if exchange.body_failed else "unknown")).inc()
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
        "token": credential.origin if credential else exchange.credential_kind,
        "token_sha256": credential.fingerprint if credential else None,
        "complete": exchange.complete,
    }
    if not exchange.complete:
        record["cut_by"] = "client" if exchange.body_failed and exchange.cut_by is None else exchange.cut_by
    if exchange.reason:
        record["reason"] = exchange.reason
    if exchange.aborted:
        record["aborted"] = exchange.aborted
    if exchange.mirror:
        record["mirror"] = exchange.mirror
    if exchange.lfs:  # the object, never the href: its query is the storage's signature
        lfs = exchange.lfs
        record.update(lfs_action=lfs.action, oid=lfs.oid, size=lfs.size, storage_host=lfs.storage_host)
    if not route:
        path = request.raw_path.partition("?")[0][:200]  # no query: it is the one place a secret could be
        record["path"] = "/_lfs/…" if path.startswith("/_lfs/") else path  # a handle is a bearer name
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
    body: bytes | Peeked | None,
) -> aiohttp.ClientResponse:
    timeout = aiohttp.ClientTimeout(
        total=None,  # a clone of a large repo may take an hour; only silence is an error
        sock_connect=route.upstream.connect_timeout,
        sock_read=route.upstream.read_timeout,
    )
    data, length = _request_body(request, exchange, body)
    started = time.monotonic()
    try:
        response = await context.session.request(
            request.method,
            route.url,
            headers=_upstream_headers(request.headers, credential, exchange.request_id, length),
            data=data,
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


_ONE_WRITE = 1 << 20  # aiohttp's own threshold (payload.TOO_LARGE_BYTES_BODY)


def _request_body(
    request: web.Request, exchange: _Exchange, inspected: bytes | Peeked | None
) -> tuple[bytes | io.BytesIO | AsyncIterator[bytes] | None, int | None]:
    """The body to send and the Content-Length to declare (None: none, or chunked).

    - A body the proxy read whole goes out with the length of exactly those bytes.
    - A streamed body keeps its framing: with the client's Content-Length, which aiohttp's parser framed the
      body by, and which `_streamed` checks against the bytes that really came (a shortfall aborts the upstream
      connection rather than leave it waiting for the rest); or chunked, as the client sent it. A body the proxy
      began to read (a Peeked head) is streamed the same way: the head first, then the rest as it comes.
    The app runs with auto_decompress=False, so these are the bytes git sent, gzip and all."""
    if isinstance(inspected, bytes):
        exchange.bytes_in += len(inspected)
    if isinstance(inspected, Peeked) and inspected.whole:
        inspected = inspected.head  # counted in as it was read (peek_body's progress)
    if isinstance(inspected, bytes):
        exchange.request_sent = True
        # aiohttp writes a large bytes body in one go, blocking the loop meanwhile; from a BytesIO, in chunks.
        data: bytes | io.BytesIO = io.BytesIO(inspected) if len(inspected) > _ONE_WRITE else inspected
        return data, len(inspected)
    if not request.body_exists:
        exchange.request_sent = True
        return None, None
    head = inspected.head if inspected is not None else b""
    return _streamed(request.content, exchange, request.content_length, head), request.content_length


async def _streamed(
    content: aiohttp.StreamReader, exchange: _Exchange, declared: int | None, head: bytes = b""
) -> AsyncIterator[bytes]:
    received = 0
    try:
        if head:  # counted in when it was read
            received += len(head)
            yield head
        async for chunk in content.iter_any():
            received += len(chunk)
            exchange.bytes_in += len(chunk)
            yield chunk
        if declared is not None and received != declared:
            raise RequestBodyRefused(f"request body ended after {received} of its {declared} bytes")
    except BaseException:
        # aiohttp closes the upstream connection when a body generator raises, but if upstream already answered,
        # the error never reaches the response body being read (and its read timeout is dropped): upstream would
        # wait for the rest of the body, and the proxy for the rest of the answer, for ever. So close it here.
        exchange.body_failed = True
        exchange.close_upstream()
        raise
    exchange.request_sent = True


def _upstream_headers(
    headers: CIMultiDictProxy[str], credential: Credential | None, request_id: str, content_length: int | None
) -> CIMultiDict[str]:
    out = CIMultiDict((name, value) for name, value in headers.items() if name.lower() in _FORWARDED_REQUEST_HEADERS)
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


def _refuse_control_characters(upstream: aiohttp.ClientResponse, host: str) -> None:
    """aiohttp refuses to write a header value with a control character (it could split the response): an answer
    carrying one is refused with its reason, from GitHub or a storage host alike, rather than crash mid-answer."""
    if any(_CONTROL.search(value) for value in upstream.headers.values()):
        raise UpstreamBadResponse(f"{host} answered with a control character in a header")


def _response_headers(upstream: aiohttp.ClientResponse, route: Route) -> CIMultiDict[str]:
    _refuse_control_characters(upstream, route.upstream.host)
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
