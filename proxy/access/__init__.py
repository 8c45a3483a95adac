"""Access: who may use this proxy, for which repos, and whether they may push. Decided before any token is fetched."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import AccessClient
from ..errors import AuthenticationRequired, ClientForbidden
from ..routing import Route
from .clients import Client, StaticClients, basic_password
from .writes import enforce_read_only, is_write, read_only_party

__all__ = ["AccessControl", "Client", "enforce_read_only", "is_write", "read_only_party"]


class AccessControl:
    """Built once per config. Without clients, everyone may pass; with clients, nothing passes without a token."""

    def __init__(self, clients: Sequence[AccessClient]) -> None:
        self._static = StaticClients(clients)

    @property
    def enabled(self) -> bool:
        return bool(self._static)

    def authenticate(self, authorization: str | None) -> Client | None:
        """Runs before routing, so that without a token nobody learns which hosts or repos the proxy serves."""
        if not self._static:
            return None
        client = self._static.identify(authorization)
        if client is None and basic_password(authorization) is None:
            raise AuthenticationRequired("this proxy needs a client token (as the password of HTTP Basic auth)")
        if client is None:
            raise AuthenticationRequired("client token not recognised: check the password git sends to this proxy")
        return client

    def authorize(self, client: Client | None, route: Route) -> None:
        # `matched` is the string the entry's pattern matched (host, baseUrl path, owner/repo), so a client allowed
        # `git.company.local/acme/app` is not let into `git.company.local/team-b/acme/app`.
        if client is not None and not any(pattern.fullmatch(route.matched) for pattern in client.repos):
            raise ClientForbidden(f"client {client.name!r} may not access {route.matched}")
