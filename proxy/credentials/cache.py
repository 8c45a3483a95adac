"""Token cache: one token per installation, refreshed before expiry by exactly one mint, and no failure ever stored."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiocache import SimpleMemoryCache
from aiocache.serializers import NullSerializer

from . import Credential

log = logging.getLogger("git_token_proxy.cache")

T = TypeVar("T")
# When a refresh fails but the old token still has this long to live, it is used rather than failing the clone.
STALE_GRACE = 60.0


class SingleFlight(Generic[T]):
    """Concurrent callers for one key share one call: its result, or its error, goes to all of them."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._land(key, done))
        # shield: one impatient client (git killed mid-clone) must not cancel the mint the others wait for.
        return await asyncio.shield(flight)

    def _land(self, key: Hashable, flight: asyncio.Future[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: an error nobody waited for is not logged as "never retrieved"


class BoundedStore:
    """aiocache's SimpleMemoryCache (entries expire by TTL) with a bound on the number of entries, oldest out."""

    def __init__(self, max_entries: int, namespace: str) -> None:
        # timeout=None: aiocache would otherwise wrap every get in asyncio.wait_for, a task per lookup.
        self._cache = SimpleMemoryCache(serializer=NullSerializer(), namespace=namespace, timeout=None)
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._max_entries = max_entries

    async def get(self, key: str) -> Any:
        return await self._cache.get(key)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        await self._cache.set(key, value, ttl=max(ttl, 0.001))
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._max_entries:
            oldest, _ = self._keys.popitem(last=False)
            await self._cache.delete(oldest)

    async def delete(self, key: str) -> None:
        self._keys.pop(key, None)
        await self._cache.delete(key)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class CachedToken:
    """A token with its deadlines on the monotonic clock, and its two Credential forms built once."""

    minted: Credential  # origin "minted": what the request that paid for the mint gets
    reused: Credential  # origin "cached": what every later request gets
    expires_at_wall: str  # GitHub's expires_at, for logs and `check`
    expires: float  # monotonic deadline: GitHub's expires_at, judged on GitHub's own clock
    refresh_at: float  # monotonic: when to replace it (refreshBefore ahead of expiry, or at the max age)
    permissions: dict[str, str] = field(default_factory=dict)


class TokenCache:
    """Keyed by whatever identifies one token (api, issuer, installation, scope), never by repo URL."""

    def __init__(self, *, max_entries: int, max_age: float, refresh_before: float) -> None:
        self._store = BoundedStore(max_entries, "tokens")
        self._flights: SingleFlight[tuple[CachedToken, bool]] = SingleFlight()
        self.max_age = max_age
        self.refresh_before = refresh_before
        self.mints = 0

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
        if cached is not None and time.monotonic() < cached.refresh_at:
            return cached.reused
        token, minted_here = await self._flights.run(key, lambda: self._refresh(key, cached, mint))
        return token.minted if minted_here else token.reused

    async def _refresh(
        self, key: str, stale: CachedToken | None, mint: Callable[[], Awaitable[CachedToken]]
    ) -> tuple[CachedToken, bool]:
        try:
            token = await mint()
        except Exception:
            # Never cached: the next request tries again. An old token that is still good is better than a
            # failed clone, though, so it serves until shortly before it expires.
            if stale is not None and time.monotonic() < stale.expires - STALE_GRACE:
                log.warning("token refresh failed; the current token stays in use until it nears expiry")
                return stale, False
            raise
        self.mints += 1
        await self._store.set(key, token, ttl=token.expires - time.monotonic())
        return token, True

    async def evict(self, key: str, credential: Credential) -> bool:
        """Drop the token if it is still the one that failed (a newer one may already have replaced it)."""
        cached: CachedToken | None = await self._store.get(key)
        if cached is not None and cached.reused.token == credential.token:
            await self._store.delete(key)
        return True

    async def peek(self, key: str) -> CachedToken | None:
        return await self._store.get(key)  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self._store)
