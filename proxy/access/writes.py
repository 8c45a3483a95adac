"""Writes: which requests write, who makes a request read-only, and the refusal of writes before any token."""

from __future__ import annotations

import json

from aiohttp import web

from ..bodies import read_whole_body
from ..config import AuthEntry
from ..errors import ReadOnlyRefused
from ..routing import LFS_BATCH, Route, Service
from .clients import Client

LFS_BATCH_LIMIT = 1024 * 1024  # a batch request lists object ids and sizes; a megabyte is thousands of objects


def is_write(route: Route, method: str) -> bool:
    """Writes: receive-pack (including its info/refs), and what the endpoint table marks as writing."""
    return route.service is Service.RECEIVE_PACK or method in route.endpoint.write_methods


def read_only_party(client: Client | None, entry: AuthEntry | None) -> str | None:
    """Who makes this request read-only ("client 'ci'", "auth entry 'acme-app'"), or None: it may write."""
    if client is not None and client.read_only:
        return f"client {client.name!r}"
    if entry is not None and entry.read_only:
        return f"auth entry {entry.id!r}"
    return None


async def enforce_read_only(
    request: web.Request, route: Route, client: Client | None, body_timeout: float
) -> bytes | None:
    """Refuse writes for a read-only client or entry. An LFS batch request is read whole (bounded in size and
    time) to see whether it uploads; its bytes are returned, and `forward` sends exactly them with a
    Content-Length it computes. None: nothing was read, stream as usual."""
    who = read_only_party(client, route.entry)
    if who is None:
        return None
    if is_write(route, request.method):
        raise ReadOnlyRefused(f"{who} is read-only: pushes to {route.repo} are refused")
    if route.endpoint is not LFS_BATCH:
        return None
    body = await read_whole_body(request, LFS_BATCH_LIMIT, body_timeout)
    if _lfs_operation(body) != "download":
        raise ReadOnlyRefused(f"{who} is read-only: only LFS downloads from {route.repo} are allowed")
    return body


def _lfs_operation(body: bytes) -> str | None:
    """The batch request's `operation`, only when every JSON parser would read the same one: upstream is not
    necessarily Python (Go's encoding/json matches keys case-insensitively, and the last one wins), so a document
    with two keys that fold to `operation` has no single answer and is not trusted."""
    seen: list[str] = []

    def collect(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen.extend(key for key, _ in pairs if key.casefold() == "operation")
        return dict(pairs)

    try:
        document = json.loads(body, object_pairs_hook=collect)
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` a hundred thousand deep
        return None
    if not isinstance(document, dict) or len(seen) != 1 or "operation" not in document:
        return None
    operation = document["operation"]
    return operation if isinstance(operation, str) else None
