"""Access: who may use this proxy, for which repos, and whether they may push. Decided before any token is fetched."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from .bodies import read_whole_body
from .config import AccessClient, AuthEntry
from .errors import AuthenticationRequired, ClientForbidden, ReadOnlyRefused
from .routing import LFS_BATCH, LinearPattern, Route, Service, compile_repo_pattern

LFS_BATCH_LIMIT = 1024 * 1024  # a batch request lists object ids and sizes; a megabyte is thousands of objects


def is_write(route: Route, method: str) -> bool:
    """Writes: receive-pack (including its info/refs), and what the endpoint table marks as writing."""
    return route.service is Service.RECEIVE_PACK or method in route.endpoint.write_methods


@dataclass(frozen=True)
class Client:
    name: str
    digest: bytes
    repos: tuple[LinearPattern, ...]
    read_only: bool


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


class AccessControl:
    """Built once per config. Without clients, everyone may pass; with clients, nothing passes without a token."""

    def __init__(self, clients: Sequence[AccessClient]) -> None:
        self._clients = tuple(
            Client(
                c.name,
                c.digest,
                tuple(compile_repo_pattern(f"access client {c.name!r}", p) for p in c.repos),
                c.read_only,
            )
            for c in clients
        )

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    def authenticate(self, authorization: str | None) -> Client | None:
        """Runs before routing, so that without a token nobody learns which hosts or repos the proxy serves."""
        if not self._clients:
            return None
        client = self._identify(authorization)
        if client is None:
            raise AuthenticationRequired("this proxy needs a client token (as the password of HTTP Basic auth)")
        return client

    def authorize(self, client: Client | None, route: Route) -> None:
        # `matched` is the string the entry's pattern matched (host, baseUrl path, owner/repo), so a client allowed
        # `git.company.local/acme/app` is not let into `git.company.local/team-b/acme/app`.
        if client is not None and not any(pattern.fullmatch(route.matched) for pattern in client.repos):
            raise ClientForbidden(f"client {client.name!r} may not access {route.matched}")

    def _identify(self, authorization: str | None) -> Client | None:
        password = _basic_password(authorization)
        if password is None:
            return None
        digest = hashlib.sha256(password.encode()).digest()
        found = None
        for client in self._clients:  # every client is compared, so the time taken says nothing about which
            if hmac.compare_digest(client.digest, digest):
                found = client
        return found


def _basic_password(authorization: str | None) -> str | None:
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error, and non-ASCII text, which b64decode refuses
        return None
    return password if colon and password else None
