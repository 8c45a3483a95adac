"""Token cache: one token per installation, refreshed before expiry by exactly one mint, and no failure ever stored."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeGuard, TypeVar

from ..metrics import Metrics
from . import Credential

if TYPE_CHECKING:
    from aiocache import SimpleMemoryCache

    from .shared import SharedTokens  # shared.py builds on this module: the import only serves the type

log = logging.getLogger("git_token_proxy.cache")

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
# A token due for refresh that still has this long to live keeps serving while the refresh runs in the background.
STALE_GRACE = 60.0
# After a background refresh failed, the next one waits this long: an outage must not add a timeout to every clone.
RETRY_AFTER_FAILURE = 15.0


class SingleFlight(Generic[T]):
    """Concurrent callers for one key share one call: its result, or its error, goes to all of them."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        # shield: one impatient client (git killed mid-clone) must not cancel the mint the others wait for.
        return await asyncio.shield(self.start(key, call))

    def start(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Join the call in flight for `key`, or start one; the caller may await it or leave it running."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._land(key, done))
        return flight

    def _land(self, key: Hashable, flight: asyncio.Future[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: an error nobody waited for is not logged as "never retrieved"


class BoundedDict(OrderedDict[K, V]):
    """A dict that keeps at most `max_entries`, the least recently set out first. For every side table keyed by
    something a client can vary (a repo, an owner, a token), so that no scan can grow it without end."""

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.max_entries:
            self.popitem(last=False)


class BoundedStore:
    """aiocache's SimpleMemoryCache (entries expire by TTL) with a bound on the number of entries, oldest out.

    The SimpleMemoryCache is made by the first `set`, and aiocache imported then: importing aiocache imports
    redis-py too (about 5 MiB of RSS, for a backend never used here), and a proxy with static tokens only, whose
    token cache stays empty, never stores anything."""

    def __init__(self, max_entries: int, namespace: str) -> None:
        self._cache: SimpleMemoryCache | None = None
        self._namespace = namespace
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._max_entries = max_entries

    async def get(self, key: str) -> Any:
        return None if self._cache is None else await self._cache.get(key)

    async def set(self, key: str, value: Any, ttl: float) -> None:
        if self._cache is None:
            self._cache = _memory_cache(self._namespace)
        await self._cache.set(key, value, ttl=max(ttl, 0.001))
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self._max_entries:
            oldest, _ = self._keys.popitem(last=False)
            await self._cache.delete(oldest)

    async def delete(self, key: str) -> None:
        self._keys.pop(key, None)
        if self._cache is not None:
            await self._cache.delete(key)

    def clear(self) -> None:
        self._cache = None
        self._keys.clear()

    def held_keys(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _memory_cache(namespace: str) -> SimpleMemoryCache:
    from aiocache import SimpleMemoryCache
    from aiocache.serializers import NullSerializer

    # timeout=None: aiocache would otherwise wrap every get in asyncio.wait_for, a task per lookup.
    return SimpleMemoryCache(serializer=NullSerializer(), namespace=namespace, timeout=None)


@dataclass
class LeaseWait:
    """A replica waiting on another's lease. Each holder gets the lease's life; after that the waiter gives up on
    it (`given_up_on`) and takes the lease itself. Holders that keep changing cannot hold a waiter for ever: past
    twice the lease's life, it mints on its own."""

    started: float
    lease_ttl: float
    holder: str | None = None
    holder_since: float = 0.0
    given_up_on: str | None = None
    first_wait: bool = True
    delay: float = 0.01

    def note_holder(self, holder: str, now: float) -> bool:
        """True when the waiter gives up on `holder` now (it held the lease past its life)."""
        if holder != self.holder:
            self.holder, self.holder_since, self.given_up_on = holder, now, None
            return False
        if now - self.holder_since > self.lease_ttl + 1 and self.given_up_on != holder:
            self.given_up_on = holder
            return True
        return False

    def over(self, now: float) -> bool:
        return now - self.started > 2 * (self.lease_ttl + 1)

    def next_delay(self) -> float:
        self.first_wait = False
        self.delay = min(self.delay * 2, 0.25)
        return self.delay


@dataclass(frozen=True)
class CachedToken:
    """A token with its deadlines on the monotonic clock, and its two Credential forms built once."""

    minted: Credential  # origin "minted": what the request that paid for the mint gets
    reused: Credential  # origin "cached": what every later request gets
    expires_at_wall: str  # GitHub's expires_at, for logs and `check`
    expires: float  # monotonic deadline: GitHub's expires_at, judged on GitHub's own clock
    refresh_at: float  # monotonic: when to replace it (refreshBefore ahead of expiry, or at the max age)
    permissions: dict[str, str] = field(default_factory=dict)


def _usable(token: CachedToken | None) -> TypeGuard[CachedToken]:
    return token is not None and time.monotonic() < token.refresh_at


class TokenCache:
    """Keyed by whatever identifies one token (api, issuer, installation, scope), never by repo URL."""

    def __init__(
        self, *, max_entries: int, max_age: float, refresh_before: float, metrics: Metrics | None = None,
        shared: SharedTokens | None = None,
    ) -> None:  # fmt: skip
        self._store = BoundedStore(max_entries, "tokens")
        self._metrics = metrics or Metrics()
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
            token = await (self._fleet_refresh(key, mint) if self._shared is not None else mint())
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

    async def _fleet_refresh(self, key: str, mint: Callable[[], Awaitable[CachedToken]]) -> CachedToken:
        """Single flight across the fleet. The in-process flight in front means one Redis round-trip per key at a
        time from this replica. The replica that takes the lease mints and publishes; the others wait for its
        value, for at most the lease's life (every lease of ours is that short: a lease without a deadline, or
        with a longer one, is not ours and is taken over at once). A waiter that gives up on a holder takes the
        lease from it, so that the others go on waiting for one mint rather than each minting its own. A failed
        mint releases the lease and publishes nothing. With Redis away, this is a plain local mint."""
        shared = self._shared
        assert shared is not None
        found = await shared.fetch(key)
        if _usable(found):
            self._metrics.shared_cache_hits.inc()
            return found
        self._metrics.shared_cache_misses.inc()
        started = time.monotonic()
        waiting = LeaseWait(started, shared.lease_ttl)
        while True:
            lease = await shared.lease(key, take_from=waiting.given_up_on)
            if lease.owner is not None:
                try:
                    found = await shared.fetch(key)  # the previous holder may have published just now
                    if _usable(found):
                        return found
                    token = await mint()
                    await shared.publish(key, token)
                    return token
                finally:
                    await shared.release(key, lease.owner)
            if lease.holder is None or waiting.over(time.monotonic()):
                return await mint()  # Redis is away, or the wait outlived every holder it could: as without a fleet
            if waiting.note_holder(lease.holder, time.monotonic()):
                continue  # gave up on this holder: take the lease from it at once
            if waiting.first_wait:
                self._metrics.lease_waits.inc()
            await asyncio.sleep(waiting.next_delay())
            found = await shared.fetch(key)
            if _usable(found):
                self._metrics.lease_wait_seconds.observe(time.monotonic() - started)
                self._metrics.shared_cache_hits.inc()
                return found

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
