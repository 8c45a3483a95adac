"""The edge: every request's frame (its id on each log line, the in-flight gauge, a reasoned 500 for a bug), the
proxy's own refusals, and what is recorded of each request: its metrics and its audit line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from ..errors import ProxyError
from ..logs import REQUEST_ID, sanitise_for_client
from ..metrics import REFUSED, Metrics
from .context import FORWARD_CONTEXT
from .exchange import Exchange
from .phases import Answer

log = logging.getLogger("git_token_proxy.forward")
audit_log = logging.getLogger("git_token_proxy.audit")

Serve = Callable[[Exchange], Awaitable[web.StreamResponse]]


async def at_the_edge(request: web.Request, serve: Serve, what: str | None = None) -> web.StreamResponse:
    """`what` names the request in a 500's log line (by default its method and path)."""
    exchange = Exchange.of(request, request.app[FORWARD_CONTEXT])
    metrics = exchange.context.metrics
    REQUEST_ID.set(exchange.request_id)  # every log line of this request (and of a mint it starts) carries it
    metrics.in_flight.inc()
    try:
        return await serve(exchange)
    except ProxyError as error:
        return refuse(error, exchange)
    except Exception:
        # A bug, or something no one thought of: one log line with the traceback, a reasoned 500 for git, and a
        # metric and an audit line that say so, instead of aiohttp's bare 500 without a request id.
        what = what or f"{request.method} {request.raw_path.partition('?')[0][:200]}"
        log.exception("unexpected error while serving %s", what)
        metrics.unexpected_errors.inc()
        return _refuse_unexpected(exchange)
    finally:
        metrics.in_flight.dec()
        _record(metrics, exchange)
        _audit(exchange)


def refuse(error: ProxyError, exchange: Exchange) -> web.Response:
    """The proxy's own answer: the error's status, and its reason as text git prints as `remote: …`."""
    # Whatever a message quotes (a path, GitHub's own words) is capped, stripped of control characters and
    # redacted before git prints it to a terminal: logs are not the only place a secret could surface.
    exchange.status, exchange.reason = error.status, sanitise_for_client(str(error))
    exchange.answer = Answer.DONE  # the refusal is the whole answer
    headers = {"X-Request-Id": exchange.request_id}
    if exchange.status == 401:  # only access control's own challenge may make git ask for a password
        headers["WWW-Authenticate"] = 'Basic realm="git-token-proxy"'
    # text/plain: git prints each line as `remote: ...`.
    return web.Response(status=exchange.status, text=f"{exchange.reason}\n", content_type="text/plain", headers=headers)


def _refuse_unexpected(exchange: Exchange) -> web.Response:
    exchange.status, exchange.reason = 500, "internal error (see the proxy's log)"
    exchange.answer = Answer.DONE
    text = f"git-token-proxy: internal error; its log has the details under request id {exchange.request_id}\n"
    return web.Response(status=500, text=text, content_type="text/plain", headers={"X-Request-Id": exchange.request_id})


def _record(metrics: Metrics, exchange: Exchange) -> None:
    if not exchange.complete:
        metrics.transfers_cut.labels(exchange.cut_side or "unknown").inc()
    served = exchange.route is not None and exchange.reason is None
    service = exchange.route.service.value if served and exchange.route else REFUSED
    metrics.requests.labels(service, f"{exchange.status // 100}xx").inc()
    metrics.received_bytes.labels(service).inc(exchange.bytes_in)
    metrics.sent_bytes.labels(service).inc(exchange.bytes_out)


def _audit(exchange: Exchange) -> None:
    """One JSON line per request: who, which repo, what happened, how much. Never a token, only its fingerprint."""
    request, route, credential = exchange.request, exchange.route, exchange.credential
    record: dict[str, object] = {
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
        record["cut_by"] = exchange.cut_side
    if exchange.reason:
        record["reason"] = exchange.reason
    if exchange.aborted:
        record["aborted"] = exchange.aborted
    if exchange.mirror:
        record["mirror"] = exchange.mirror
    if exchange.identity is not None:
        record["identity"] = exchange.identity
    if exchange.push_refs is not None:
        record["refs"] = exchange.push_refs
    if exchange.lfs:  # the object, never the href: its query is the storage's signature
        lfs = exchange.lfs
        record.update(lfs_action=lfs.action, oid=lfs.oid, size=lfs.size, storage_host=lfs.storage_host)
    if not route:
        path = request.raw_path.partition("?")[0][:200]  # no query: it is the one place a secret could be
        record["path"] = "/_lfs/…" if path.startswith("/_lfs/") else path  # a handle is a bearer name
    audit_log.info("%s", json.dumps(record, separators=(",", ":")))
