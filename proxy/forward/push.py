"""Push: the one question forward asks of a push when a policy applies: may it go on, and if not, what does git
read? The ref updates are read off the wire (the receive-pack command list), before any credential is chosen."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from ..access import Client
from ..errors import ProxyError, PushRefused
from ..routing import Service
from .exchange import Exchange
from .phases import Answer
from .upstream import credential_for

if TYPE_CHECKING:
    from ..push.ancestry import Ancestry, CompareFn
    from ..push.gate import PassOn
    from ..push.outcome import UpstreamReport
    from ..push.rules import BoundPolicy

__all__ = ["police_receive_pack", "policies_for", "read_push_report", "refuse_lfs_outside_policy"]

log = logging.getLogger("git_token_proxy.push")

# What is read of a refused push before its answer, so that git (which reads an answer only once its whole body is
# sent) prints the reason rather than "RPC failed". Past this, the connection is closed instead.
DRAIN_LIMIT = 4 << 30


def policies_for(exchange: Exchange, client: Client | None) -> list[BoundPolicy]:
    """The policies a push through this route must pass: its entry's and its client's, bound to the client."""
    settings = exchange.context.push
    if settings is None:
        return []
    entry = exchange.routed.entry
    name = client.name if client is not None else None
    entry_policy = settings.entry_policies.get(entry.id) if entry is not None else None
    bound = [entry_policy.bind(name)] if entry_policy is not None else []
    if client is not None:
        bound += [policy.bind(client.name) for policy in client.scope.push]
    return bound


async def police_receive_pack(exchange: Exchange, client: Client | None) -> PassOn | web.Response | None:
    """None: no policy applies, the push streams as before. A PassOn: it may go on, with exactly the bytes read
    for the check first. A response: git's own `[remote rejected]` report (or a 400 for a request that cannot
    be read), after the rest of the body was read and dropped; nothing went upstream, and no token was used
    unless a fast-forward had to be checked with GitHub."""
    request, route = exchange.request, exchange.routed
    if route.service is not Service.RECEIVE_PACK or request.method != "POST":
        return None
    policies = policies_for(exchange, client)
    if not policies:
        return None
    from ..push.gate import PushLimits, Refused, check_push, discard_rest

    who = client.name if client is not None else (route.entry.id if route.entry else "anonymous")
    outcome = await check_push(
        request.content, request.headers.get("Content-Encoding"), policies, who, _compare_for(exchange, who),
        PushLimits(shared=exchange.live.held_pushes), exchange.count_in,
    )  # fmt: skip
    exchange.push_refs = [ref.as_audit() for ref in outcome.refs]
    if not isinstance(outcome, Refused):
        return outcome
    entry = route.entry.id if route.entry else ""
    exchange.context.metrics.push_refused.labels(entry, outcome.reason.value).inc()
    log.info("%s", outcome.message)
    drained = await discard_rest(request.content, DRAIN_LIMIT)
    exchange.bytes_in = max(exchange.bytes_in, request.content.total_bytes)  # what was drained counts too
    exchange.status, exchange.reason, exchange.answer = outcome.status, outcome.message, Answer.DONE
    exchange.bytes_out = len(outcome.body)
    headers = {**outcome.headers, "X-Request-Id": exchange.request_id}
    if not drained:
        headers["Connection"] = "close"
    return web.Response(status=outcome.status, headers=headers, body=outcome.body)


def read_push_report(
    exchange: Exchange, body: object, chunks: AsyncIterator[tuple[bytes, bool]]
) -> AsyncIterator[tuple[bytes, bool]]:
    """Upstream's answer to a push a policy let through, passed on unchanged while its report (`ok` / `ng <ref>
    <reason>`) is read for the audit line: each ref's result becomes upstream's own. Any other answer (a clone's
    pack) is `chunks` itself: no extra step per chunk."""
    commands = getattr(body, "commands", None)
    if commands is None or not commands.updates or exchange.push_refs is None:
        return chunks
    from ..push.outcome import UpstreamReport

    report = UpstreamReport([update.ref for update in commands.updates], commands.capabilities)
    return _reading_report(exchange, report, chunks)


async def _reading_report(
    exchange: Exchange, report: UpstreamReport, chunks: AsyncIterator[tuple[bytes, bool]]
) -> AsyncIterator[tuple[bytes, bool]]:
    assert exchange.push_refs is not None
    try:
        async for chunk, last in chunks:
            report.feed(chunk)
            yield chunk, last
    finally:
        for ref in exchange.push_refs:
            ref["result"] = report.results.get(ref["ref"], "sent")


def _compare_for(exchange: Exchange, who: str) -> CompareFn | None:
    """GitHub's compare API for this repo, asked with the entry's credential (fetched on the first question
    only: a push refused for its refs never needs one), within the entry's and the party's budget of questions.
    None without an entry or an API to ask: such updates are refused as undecidable."""
    settings, route, source = exchange.context.push, exchange.routed, exchange.source
    entry = route.entry
    api_url = settings.api_urls.get(entry.id) if settings is not None and entry is not None else None
    if settings is None or entry is None or api_url is None or source is None:
        return None
    from ..push.ancestry import CompareFailed
    from ..push.compare import compare_commits

    async def compare(base: str, head: str) -> Ancestry:
        if not await settings.compare_budget.spend(entry.id, who):
            raise CompareFailed(settings.compare_budget.describe(entry.id, who))
        try:
            credential = await credential_for(source, route, exchange.context.metrics)
        except ProxyError as error:
            raise CompareFailed(f"no credential to ask GitHub with: {error}") from None
        assert credential is not None
        exchange.credential = credential  # the audit line names the token the question was asked with
        authorization = f"token {credential.token}"
        repo = route.repo
        return await compare_commits(settings.api_session, api_url, repo.owner, repo.name, authorization, base, head)

    return compare


def refuse_lfs_outside_policy(exchange: Exchange, client: Client | None, body: bytes) -> None:
    """LFS under a push policy: an upload needs a party that may push at least one ref of the repo; a lock or an
    unlock needs the ref it names (`ref.name`) to be one the party may push, and one that names none is allowed
    only where the policies allow every ref (such a lock holds on every branch). Listing locks (`verify`)
    without a ref needs only what an upload needs."""
    policies = policies_for(exchange, client)
    if not policies or exchange.request.method != "POST":
        return
    from ..push.rules import allows_every_ref, lock_ref_allowed, may_push_any

    route, who = exchange.routed, _who(exchange, client)
    fields = _json_fields(body)
    segments = route.endpoint.segments
    locks = "locks" in segments
    ref = fields.get("ref")
    if locks and isinstance(ref, str):
        if not lock_ref_allowed(ref, policies):
            raise PushRefused(f"LFS lock on {ref} is not allowed for {who}: outside its push policy")
    elif locks and segments[-1] != "verify" and not allows_every_ref(policies):
        raise PushRefused(
            f"LFS locks in {route.repo} must name a ref (ref.name) for {who}: its push policy allows only some refs"
        )
    elif (locks or fields.get("operation") != "download") and not may_push_any(policies):
        raise PushRefused(f"LFS uploads and locks in {route.repo} are not allowed for {who}")


def _who(exchange: Exchange, client: Client | None) -> str:
    entry = exchange.routed.entry
    return f"'{client.name}'" if client is not None else f"auth entry '{entry.id if entry else ''}'"


_READ_KEYS = frozenset({"operation", "ref", "name"})


def _json_fields(body: bytes) -> dict[str, str | None]:
    """`operation` and `ref.name` of an LFS request, each only when every JSON parser would read the same one.
    Go's encoding/json (git-lfs servers) matches keys without regard to case and keeps the last of duplicates:
    a duplicate, or a key that differs from one read here only in case (`Ref`, `NAME`), reads as "unknown"."""
    ambiguous = False

    def collect(pairs: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal ambiguous
        folded = [key.casefold() for key, _ in pairs]
        if len(set(folded)) != len(pairs) or any(
            fold in _READ_KEYS and key != fold for (key, _), fold in zip(pairs, folded, strict=True)
        ):
            ambiguous = True
        return dict(pairs)

    try:
        document = json.loads(body, object_pairs_hook=collect)
    except (ValueError, RecursionError):
        return {"operation": None, "ref": "<unreadable>"}
    if not isinstance(document, dict) or ambiguous:
        return {"operation": None, "ref": "<unreadable>"}
    ref = document.get("ref")
    name = ref.get("name") if isinstance(ref, dict) else None
    operation = document.get("operation")
    return {
        "operation": operation if isinstance(operation, str) else None,
        "ref": name if isinstance(name, str) else ("<unreadable>" if ref is not None else None),
    }
