"""Access: who may use this proxy, for which repos, and whether they may push. Decided before any token is fetched."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .config import AccessClient, ConfigError
from .errors import AuthenticationRequired, ClientForbidden, ReadOnlyRefused
from .routing import Route, Service, translate_java_regex

# Writes: receive-pack, and LFS lock changes. (An LFS upload is a batch POST whose body says "upload"; the proxy
# does not read bodies, so read-only entries rely on the token's own permissions for those.)
_WRITE_ENDPOINT_SUFFIXES = ("/info/lfs/locks", "/unlock")


def is_write(route: Route, method: str) -> bool:
    if route.service is Service.RECEIVE_PACK:
        return True
    path = route.url.split("?", 1)[0]
    return route.service is Service.LFS and method == "POST" and path.endswith(_WRITE_ENDPOINT_SUFFIXES)


def refuse_writes_through_read_only_entry(route: Route, method: str) -> None:
    if route.entry is not None and route.entry.read_only and is_write(route, method):
        raise ReadOnlyRefused(f"auth entry {route.entry.id!r} is read-only: pushes to {route.repo} are refused")


@dataclass(frozen=True)
class _Client:
    name: str
    digest: bytes
    repos: tuple[re.Pattern[str], ...]
    read_only: bool


class AccessControl:
    """Built once per config. `enabled` is False when no clients are configured: then everyone may pass."""

    def __init__(self, clients: Sequence[AccessClient]) -> None:
        self._clients = tuple(
            _Client(c.name, c.digest, tuple(_compile_repo_pattern(c.name, p) for p in c.repos), c.read_only)
            for c in clients
        )

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    def admit(self, authorization: str | None, route: Route, method: str) -> str | None:
        """The client's name, or an error: 401 without valid credentials, 403 for the wrong repo or a push."""
        if not self._clients:
            return None
        client = self._identify(authorization)
        if client is None:
            raise AuthenticationRequired("this proxy needs a client token (as the password of HTTP Basic auth)")
        repo = str(route.repo)
        if not any(pattern.fullmatch(repo) for pattern in client.repos):
            raise ClientForbidden(f"client {client.name!r} may not access {repo}")
        if client.read_only and is_write(route, method):
            raise ReadOnlyRefused(f"client {client.name!r} is read-only: pushes to {repo} are refused")
        return client.name

    def _identify(self, authorization: str | None) -> _Client | None:
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
    try:
        return re.compile(f"(?:{translate_java_regex(pattern)}).*", re.IGNORECASE | re.DOTALL)
    except re.error as error:
        raise ConfigError(f"access client {client!r}: repos pattern '{pattern}' does not compile: {error}") from None
