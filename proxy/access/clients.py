"""Clients: who is calling, proved by a static token listed in `access.clients`; every kind of client yields
the same `Client`."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import AccessClient
from ..routing import LinearPattern, compile_repo_pattern


@dataclass(frozen=True)
class Client:
    name: str
    digest: bytes
    repos: tuple[LinearPattern, ...]
    read_only: bool


class StaticClients:
    """`access.clients`: a client is the one whose token's SHA-256 matches."""

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

    def __bool__(self) -> bool:
        return bool(self._clients)

    def identify(self, authorization: str | None) -> Client | None:
        password = basic_password(authorization)
        if password is None:
            return None
        digest = hashlib.sha256(password.encode()).digest()
        found = None
        for client in self._clients:  # every client is compared, so the time taken says nothing about which
            if hmac.compare_digest(client.digest, digest):
                found = client
        return found


def basic_password(authorization: str | None) -> str | None:
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error, and non-ASCII text, which b64decode refuses
        return None
    return password if colon and password else None
