"""Clients: who is calling. A static token listed in `access.clients` and a JWT from an issuer in `access.issuers`
both yield the same `Client`: a name, a scope, and (for a JWT) the identity the audit line names."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import AccessClient
from ..config.push import PushPolicyConfig
from ..routing import LinearPattern, compile_repo_pattern

if TYPE_CHECKING:
    from ..push.rules import PushPolicy


@dataclass(frozen=True)
class Scope:
    """What a client may do. Narrowing adds sets and never removes one: a repo must match a pattern of every set,
    and every push policy must allow a ref update, so nothing added to a scope can widen it."""

    repo_sets: tuple[tuple[LinearPattern, ...], ...]
    read_only: bool
    push: tuple[PushPolicy, ...] = ()

    def allows_repo(self, matched: str) -> bool:
        """`matched` is `Route.matched` (host, baseUrl path, owner/repo)."""
        return all(any(pattern.fullmatch(matched) for pattern in patterns) for patterns in self.repo_sets)


@dataclass(frozen=True)
class Client:
    name: str
    scope: Scope
    identity: dict[str, str | None] | None = None  # a JWT's: issuer, sub, jti and the token's fingerprint (audit)

    @property
    def read_only(self) -> bool:
        return self.scope.read_only


def push_policies(owner: str, config: PushPolicyConfig | None) -> tuple[PushPolicy, ...]:
    """A `push:` section compiled once; the push package loads only for a config that has one."""
    if config is None:
        return ()
    from ..push.rules import PushPolicy

    return (PushPolicy.from_config(owner, config),)


class StaticClients:
    """`access.clients`: a client is the one whose token's SHA-256 matches."""

    def __init__(self, clients: Sequence[AccessClient]) -> None:
        self._clients = tuple((c.digest, _static_client(c)) for c in clients)

    def __bool__(self) -> bool:
        return bool(self._clients)

    def identify(self, authorization: str | None) -> Client | None:
        password = basic_password(authorization)
        if password is None:
            return None
        digest = hashlib.sha256(password.encode()).digest()
        found = None
        for known, client in self._clients:  # every client is compared, so the time taken says nothing about which
            if hmac.compare_digest(known, digest):
                found = client
        return found


def _static_client(config: AccessClient) -> Client:
    where = f"access client {config.name!r}"
    repos = tuple(compile_repo_pattern(where, pattern) for pattern in config.repos)
    return Client(config.name, Scope((repos,), config.read_only, push_policies(f"client {config.name!r}", config.push)))


def basic_password(authorization: str | None) -> str | None:
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error, and non-ASCII text, which b64decode refuses
        return None
    return password if colon and password else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
