"""Verifiers: each config's identity verifier (access.issuers), over key sets kept for the life of the process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from ..config import Config

if TYPE_CHECKING:
    from .identities import IdentityVerifier
    from .jwks import KeyRegistry


class KeyRegistries:
    """Signed identities (access.issuers): one key registry for the life of the process, made when a config first
    names an issuer (so a proxy without issuers never loads PyJWT), its keys kept across reloads."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._registry: KeyRegistry | None = None

    def verifier_for(self, config: Config) -> IdentityVerifier | None:
        """Inside the running loop (a new remote key set starts fetching). ConfigError naming the issuer."""
        issuers = config.access.issuers
        if not issuers:
            return None
        from .identities import build_verifier
        from .jwks import KeyRegistry

        if self._registry is None:
            self._registry = KeyRegistry(self._session)
        return build_verifier(issuers, config.access.revoked, self._registry)

    async def retain(self, identities: IdentityVerifier | None) -> None:
        """After a swap: the key sets the running config no longer names stop refreshing."""
        if self._registry is not None:
            await self._registry.retain(identities.key_sets if identities is not None else ())

    async def close(self) -> None:
        if self._registry is not None:
            await self._registry.close()
