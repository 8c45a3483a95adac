"""Access: who may use this proxy, for which repos, and whether they may push. Decided before any token is fetched."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from .config import AccessClient, ConfigError
from .errors import AuthenticationRequired, ClientForbidden, ReadOnlyRefused
from .routing import LFS_BATCH, Route, Service, translate_java_regex

LFS_BATCH_LIMIT = 1024 * 1024  # a batch request lists object ids and sizes; a megabyte is thousands of objects


def is_write(route: Route, method: str) -> bool:
    """Writes: receive-pack (including its info/refs), and what the endpoint table marks as writing."""
    return route.service is Service.RECEIVE_PACK or method in route.endpoint.write_methods


@dataclass(frozen=True)
class Client:
    name: str
    digest: bytes
    repos: tuple[re.Pattern[str], ...]
    read_only: bool


async def enforce_read_only(request: web.Request, route: Route, client: Client | None) -> bytes | None:
    """Refuse writes for a read-only client or entry. An LFS batch request is read (bounded) to see whether it
    uploads; its bytes are returned, to be forwarded as they came. None: nothing was read, stream as usual."""
    if client is not None and client.read_only:
        who = f"client {client.name!r}"
    elif route.entry is not None and route.entry.read_only:
        who = f"auth entry {route.entry.id!r}"
    else:
        return None
    if is_write(route, request.method):
        raise ReadOnlyRefused(f"{who} is read-only: pushes to {route.repo} are refused")
    if route.endpoint is not LFS_BATCH:
        return None
    body = await request.content.read(LFS_BATCH_LIMIT + 1)
    try:
        operation = json.loads(body).get("operation") if len(body) <= LFS_BATCH_LIMIT else None
    except (ValueError, AttributeError):
        operation = None
    if operation != "download":
        raise ReadOnlyRefused(f"{who} is read-only: only LFS downloads from {route.repo} are allowed")
    return body


class AccessControl:
    """Built once per config. Without clients, everyone may pass; with clients, nothing passes without a token."""

    def __init__(self, clients: Sequence[AccessClient]) -> None:
        self._clients = tuple(
            Client(c.name, c.digest, tuple(_compile_repo_pattern(c.name, p) for p in c.repos), c.read_only)
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
        if client is not None and not any(pattern.fullmatch(str(route.repo)) for pattern in client.repos):
            raise ClientForbidden(f"client {client.name!r} may not access {route.repo}")

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
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password if colon and password else None


def _compile_repo_pattern(client: str, pattern: str) -> re.Pattern[str]:
    """Matched against host/owner/repo, ending at a segment boundary: `github\\.com/acme/app` never lets a
    client into `acme/app-secrets`, and `github\\.com/acme` never into `acme-evil`."""
    try:
        return re.compile(f"(?:{translate_java_regex(pattern)})(?:/.*)?", re.IGNORECASE | re.DOTALL)
    except re.error as error:
        raise ConfigError(f"access client {client!r}: repos pattern '{pattern}' does not compile: {error}") from None
