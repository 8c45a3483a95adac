"""Token cache: one token per installation, refreshed before expiry by exactly one mint, and no failure ever stored."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..bounded import BoundedDict, BoundedStore
from ..single_flight import SingleFlight
from . import CachedToken, Credential

log = logging.getLogger("git_token_proxy.cache")

# A token due for refresh that still has this long to live keeps serving while the refresh runs in the background.
STALE_GRACE = 60.0
# After a background refresh failed, the next one waits this long: an outage must not add a timeout to every clone.
RETRY_AFTER_FAILURE = 15.0


class FleetTier(Protocol):
    """What the cache asks of the fleet's shared tier (cache.redis: `shared.SharedTokens`), when there is one."""

    async def refresh(self, key: str, mint: Callable[[], Awaitable[CachedToken]]) -> CachedToken:
        """A usable token for `key`: one another replica published, or one from `mint`, which one replica at a
        time runs for the whole fleet. Raises what `mint` raised."""
        ...

    async def evict(self, key: str, credential: Credential) -> None:
        """Drop the fleet's token for `key`, only if it is still `credential`."""
        ...


class TokenCache:
    """Keyed by whatever identifies one token (api, issuer, installation, scope), never by repo URL."""

    def __init__(
        self, *, max_entries: int, max_age: float, refresh_before: float, shared: FleetTier | None = None
    ) -> None:
        self._store = BoundedStore(max_entries, "tokens")
        self._shared = shared  # the fleet's tier (cache.redis), or None: this process alone
        self._flights: SingleFlight[CachedToken] = SingleFlight()
        # Side tables, bounded like the store: a key that fell out of the store must not stay here for ever.
        self._next_attempt: BoundedDict[str, float] = BoundedDict(max_entries)  # after a failed refresh only
        self._expiries: BoundedDict[str, float] = BoundedDict(max_entries)  # for the soonest-expiry gauge
        self.max_age = max_age
        self.refresh_before = refresh_before

    def deadlines(self, lifetime: float) -> tuple[float, float]:
        """(expires, refresh_at) on the monotonic clock for a token with `lifetime` seconds left on GitHub's."""
        now = time.monotonic()
        expires = now + lifetime
        # A token shorter-lived than refreshBefore (never GitHub's 1 h, but a GHES setting or a test) still serves
        # for half its life instead of being re-minted on every request.
        refresh_before = min(self.refresh_before, lifetime / 2)
        return expires, min(expires - refresh_before, now + self.max_age)

    async def get(self, key: str, mint: Callable[[], Awaitable[CachedToken]]) -> Credential:
        """The hot path: one dictionary hit while the token is fresh; one shared mint when it is not."""
        cached: CachedToken | None = await self._store.get(key)
        now = time.monotonic()
        if cached is not None and now < cached.refresh_at:
            return cached.reused
        if cached is not None and now < cached.expires - STALE_GRACE:
            # Due for refresh but still good: nobody waits for GitHub. One refresh runs in the background.
            if now >= self._next_attempt.get(key, 0.0):
                self._flights.start(key, lambda: self._refresh(key, mint, background=True))
            return cached.reused
        token = await self._flights.run(key, lambda: self._refresh(key, mint, background=False))
        return token.minted  # every waiter here waited for this mint

    async def _refresh(self, key: str, mint: Callable[[], Awaitable[CachedToken]], background: bool) -> CachedToken:
        try:
            token = await (self._shared.refresh(key, mint) if self._shared is not None else mint())
        except Exception as error:
            # Never cached: the next request that needs a token tries again. Only a background refresh, whose
            # old token still serves, waits a little before the next attempt.
            if background:
                self._next_attempt[key] = time.monotonic() + RETRY_AFTER_FAILURE
                log.warning("token refresh failed (%s); the current token serves until it nears expiry", error)
            raise
        self._next_attempt.pop(key, None)
        await self._store.set(key, token, ttl=token.expires - time.monotonic())
        self._expiries[key] = token.expires
        return token

    async def evict(self, key: str, credential: Credential) -> bool:
        """Drop the token if it is still the one that failed (a newer one may already have replaced it), here
        and in the fleet's store. True if this call evicted it."""
        if self._shared is not None:
            await self._shared.evict(key, credential)
        cached: CachedToken | None = await self._store.get(key)
        if cached is None or cached.reused.token != credential.token:
            return False
        await self._store.delete(key)
        self._expiries.pop(key, None)
        return True

    def seconds_until_soonest_expiry(self) -> float:
        """NaN when no token is cached, so an alert on a low value does not fire on an idle proxy."""
        now = time.monotonic()
        live = [expires for expires in self._expiries.values() if expires > now]
        if len(live) < len(self._expiries):  # forget tokens that expired
            for key in [k for k, expires in self._expiries.items() if expires <= now]:
                del self._expiries[key]
        return min(live) - now if live else math.nan

    def forget_failures(self) -> None:
        """A reload: a refresh that failed is tried again at once, not after its pause."""
        self._next_attempt.clear()

    async def peek(self, key: str) -> CachedToken | None:
        return await self._store.get(key)  # type: ignore[no-any-return]

    async def held(self, prefix: str) -> list[CachedToken]:
        """The live tokens whose keys start with `prefix` (one source's), for revoking them on shutdown."""
        now = time.monotonic()
        found = [await self._store.get(key) for key in self._store.held_keys() if key.startswith(prefix)]
        return [token for token in found if token is not None and token.expires > now]
