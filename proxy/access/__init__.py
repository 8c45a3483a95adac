"""Access: who may use this proxy, for which repos, and whether they may push. Decided before any token is fetched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..config import AccessClient
from ..errors import AuthenticationRequired, ClientForbidden
from ..routing import Route
from .clients import Client, StaticClients, basic_password, bearer_token
from .writes import enforce_read_only, is_write, read_only_party

if TYPE_CHECKING:
    from .identities import IdentityVerifier

__all__ = ["AccessControl", "Client", "enforce_read_only", "is_write", "read_only_party"]


class AccessControl:
    """Built once per config. Without clients or issuers, everyone may pass; with them, nothing passes without a
    credential: a static client token (the Basic password), or a JWT from a trusted issuer (the Basic password,
    or a Bearer token). Either yields the same Client."""

    def __init__(self, clients: Sequence[AccessClient], identities: IdentityVerifier | None = None) -> None:
        self._static = StaticClients(clients)
        self._identities = identities if identities else None

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self._identities is not None

    @property
    def identities(self) -> IdentityVerifier | None:
        return self._identities

    async def authenticate(self, authorization: str | None) -> Client | None:
        """Runs before routing, so that without a credential nobody learns which hosts or repos the proxy serves.
        A static token is a dictionary of digests; a JWT is verified once and then remembered (see identities)."""
        if not self.enabled:
            return None
        client = self._static.identify(authorization)
        if client is not None:
            return client
        credential = basic_password(authorization) or bearer_token(authorization)
        if credential is None:
            how = "as the password of HTTP Basic auth" + (", or a Bearer token" if self._identities else "")
            raise AuthenticationRequired(f"this proxy needs a client token ({how})")
        if self._identities is not None and looks_like_jwt(credential):
            identity = await self._identities.verify(credential)
            return Client(identity.client, identity.scope, identity.audit())
        raise AuthenticationRequired("client token not recognised: check the password git sends to this proxy")

    def authorize(self, client: Client | None, route: Route) -> None:
        # `matched` is the string the entry's pattern matched (host, baseUrl path, owner/repo), so a client allowed
        # `git.company.local/acme/app` is not let into `git.company.local/team-b/acme/app`.
        if client is not None and not client.scope.allows_repo(route.matched):
            raise ClientForbidden(f"client {client.name!r} may not access {route.matched}")


def looks_like_jwt(credential: str) -> bool:
    """A JWS in compact form has exactly two dots; static client tokens are compared before this is asked."""
    return credential.count(".") == 2
