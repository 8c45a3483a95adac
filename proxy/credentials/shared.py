"""Shared tier: what every replica of a fleet can read (tokens, installation ids), sealed, behind one small protocol.

The policy (when to refresh, single flight in the process, never caching a failure) stays in `cache.py`; this module
says where shared values live, how they are sealed, and how the replicas agree on one mint (the lease). `github_app`
never learns that a shared tier exists: it gets its key-value stores from a factory, which tiers them here when the
config has `cache.redis`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from ..bounded import BoundedStore
from ..metrics import Metrics
from . import CachedToken, Credential

log = logging.getLogger("git_token_proxy.shared")

# A sealed token is a few hundred bytes (a few KiB with a long permissions map), an installation id less. The store
# refuses anything larger unread (see RedisStore.get), so that a garbage value neither crosses the network whole nor
# is decrypted on the event loop; a value this size decrypts in well under a millisecond.
MAX_VALUE = 64 * 1024
# Nothing shared lives longer than this, whatever its sealed deadline says: a token lives an hour, an installation
# id is kept an hour.
MAX_SHARED_LIFETIME = 2 * 3600.0


@dataclass(frozen=True)
class Lease:
    owner: str | None = None  # ours: the lease was taken, and is given back with this value
    holder: str | None = None  # somebody else's, who holds it now


class SharedStore(Protocol):
    """Where shared values live (Redis). Every call fails soft: an unreachable store answers like an empty one,
    so a clone never waits on it for longer than one bounded call, and never fails because of it."""

    @property
    def available(self) -> bool:
        """False while the store is known to be away (its circuit breaker is open)."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, key: str, tag: bytes | None = None) -> bool:
        """Delete the value; with `tag`, only if the stored value still starts with it (compare-and-delete)."""
        ...

    async def delete_prefix(self, prefix: str) -> None: ...

    async def lease(self, key: str, ttl: float, take_from: str | None = None) -> Lease:
        """Take the lease on `key` for `ttl` seconds. It is taken when nobody holds it, when its holder's lease
        has no deadline or a longer one than `ttl` (not one of ours: a lease is never longer), or when `take_from`
        still holds it (a waiter that gave up on that holder). Otherwise the answer names the holder. With the
        store away, neither is set, and `available` is False."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Give the lease back, only if `owner` still holds it."""
        ...

    async def close(self) -> None: ...


def _hashed(key: str) -> str:
    """Keys in the store name nothing of the org, the app or the scope: a digest of the cache key."""
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def token_tag(token: str) -> bytes:
    """A digest of a token, stored in clear before its sealed value so that Redis can compare-and-delete it. It
    cannot be used as a token, nor turned back into one."""
    return hashlib.sha256(token.encode()).hexdigest()[:32].encode()


class Sealer:
    """Fernet: AES-128-CBC with an HMAC, so a value read back is either exactly what a replica with the same key
    wrote, or refused. MultiFernet: the first key seals, every key opens (rotation).

    A sealed value is bound to the identity it was stored for (its full cache key and kind: a token, an
    installation id, a "not installed" answer), which goes inside the authenticated payload and is compared on
    open. Where a value sits in Redis proves nothing: anyone who can write there, without the key, can copy one
    entry's sealed token under another entry's key. Such a value is a miss, never a value.

    cryptography is imported in the methods, not at the top: only cache.redis makes a Sealer, and this module is
    loaded by every proxy, most of which would otherwise carry cryptography's Rust core (about 7 MiB of RSS)."""

    def __init__(self, keys: list[str]) -> None:
        from cryptography.fernet import Fernet, MultiFernet

        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])
        self._logged: set[str] = set()  # each kind of refusal is logged once per process, not once per request

    def seal(self, plain: dict[str, Any], bound_to: str) -> bytes:
        payload = {"for": _identity(bound_to), "value": plain}
        return self._fernet.encrypt(json.dumps(payload, separators=(",", ":")).encode())

    def open(self, sealed: bytes, bound_to: str) -> dict[str, Any] | None:
        """The value sealed for `bound_to`, or None: anything that does not decrypt or parse (another fleet's key,
        a value from an older version), or that was sealed for another identity. A miss, logged once per process,
        never an error and never garbage used as a token."""
        from cryptography.fernet import InvalidToken

        if len(sealed) > MAX_VALUE:
            return self._refused("oversized", f"a value in the shared cache is over {MAX_VALUE} bytes")
        try:
            payload = json.loads(self._fernet.decrypt(sealed))
        except (InvalidToken, ValueError, TypeError, RecursionError):
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("value"), dict):
            return self._refused(
                "undecryptable",
                "a value in the shared cache does not decrypt with this replica's encryptionKey (another key, or "
                "written by another fleet or an older version?)",
            )
        if not isinstance(payload.get("for"), str) or not hmac.compare_digest(payload["for"], _identity(bound_to)):
            return self._refused(
                "misplaced",
                "a value in the shared cache was sealed for another key than the one it is stored under (copied "
                "there by something that can write to Redis?)",
            )
        value: dict[str, Any] = payload["value"]
        return value

    def _refused(self, why: str, message: str) -> dict[str, Any] | None:
        """None, always: the refusal, logged the first time it happens for this reason."""
        if why not in self._logged:
            self._logged.add(why)
            log.warning("%s; it counts as a miss and is replaced (logged once)", message)
        return None


def _identity(bound_to: str) -> str:
    """What a sealed value carries of the identity it belongs to: a digest, so that its size stays small."""
    return hashlib.sha256(bound_to.encode()).hexdigest()


class SharedTokens:
    """Installation tokens in the shared store, sealed, with their deadlines on the wall clock (replicas do not
    share a monotonic clock), and the lease that lets exactly one replica mint for all. The fleet tier of
    `cache.TokenCache`."""

    def __init__(self, store: SharedStore, sealer: Sealer, lease_ttl: float, metrics: Metrics) -> None:
        self.store = store
        self._sealer = sealer
        self.lease_ttl = lease_ttl
        self._metrics = metrics

    async def refresh(self, key: str, mint: Callable[[], Awaitable[CachedToken]]) -> CachedToken:
        """Single flight across the fleet. The cache's in-process flight in front means one Redis round-trip per
        key at a time from this replica. The replica that takes the lease mints and publishes; the others wait
        for its value, for at most the lease's life (every lease of ours is that short: a lease without a
        deadline, or with a longer one, is not ours and is taken over at once). A waiter that gives up on a holder
        takes the lease from it, so that the others go on waiting for one mint rather than each minting its own.
        A failed mint releases the lease and publishes nothing. With Redis away, this is a plain local mint."""
        found = await self.fetch(key)
        if _usable(found):
            self._metrics.shared_cache_hits.inc()
            return found
        self._metrics.shared_cache_misses.inc()
        started = time.monotonic()
        waiting = LeaseWait(started, self.lease_ttl)
        while True:
            lease = await self.lease(key, take_from=waiting.given_up_on)
            if lease.owner is not None:
                try:
                    found = await self.fetch(key)  # the previous holder may have published just now
                    if _usable(found):
                        return found
                    token = await mint()
                    await self.publish(key, token)
                    return token
                finally:
                    await self.release(key, lease.owner)
            if lease.holder is None or waiting.over(time.monotonic()):
                return await mint()  # Redis is away, or the wait outlived every holder it could: as without a fleet
            if waiting.note_holder(lease.holder, time.monotonic()):
                continue  # gave up on this holder: take the lease from it at once
            if waiting.first_wait:
                self._metrics.lease_waits.inc()
            await asyncio.sleep(waiting.next_delay())
            found = await self.fetch(key)
            if _usable(found):
                self._metrics.lease_wait_seconds.observe(time.monotonic() - started)
                self._metrics.shared_cache_hits.inc()
                return found

    async def fetch(self, key: str) -> CachedToken | None:
        stored = await self.store.get(f"token:{_hashed(key)}")
        if stored is None:
            return None
        tag, _, sealed = stored.partition(b".")
        value = self._sealer.open(sealed, f"token:{key}")
        token = _token_from(value) if value is not None else None
        if token is not None and not hmac.compare_digest(tag, token_tag(token.reused.token)):
            return None  # the clear tag is only for compare-and-delete, but it must name this very token
        return token

    async def publish(self, key: str, token: CachedToken) -> None:
        lifetime = token.expires - time.monotonic()  # nothing outlives its token, in Redis either
        if lifetime <= 0:
            return
        now = time.time()
        sealed = self._sealer.seal(
            {
                "username": token.reused.username,
                "token": token.reused.token,
                "expires": now + lifetime,
                "refresh": now + (token.refresh_at - time.monotonic()),
                "expires_at": token.expires_at_wall,
                "permissions": token.permissions,
            },
            f"token:{key}",
        )
        await self.store.put(f"token:{_hashed(key)}", token_tag(token.reused.token) + b"." + sealed, lifetime)

    async def evict(self, key: str, credential: Credential) -> None:
        """Fleet-wide healing: drop the shared token only if it is still the one that failed. Replicas that see
        the same rejection later find the replacement instead of minting again."""
        await self.store.delete(f"token:{_hashed(key)}", token_tag(credential.token))

    async def lease(self, key: str, take_from: str | None = None) -> Lease:
        return await self.store.lease(f"lease:{_hashed(key)}", self.lease_ttl, take_from)

    async def release(self, key: str, owner: str) -> None:
        await self.store.release(f"lease:{_hashed(key)}", owner)


# Past a waiter's deadline, a holder that appeared after it (another waiter that took the lease over, minting now)
# has half a lease's life to publish before it is given up on too: a mint takes well under a second, but a loaded
# replica must not be robbed of a lease it took fairly (that would be a second mint).
MIN_POST_DEADLINE_GRACE = 2.0


@dataclass
class LeaseWait:
    """A replica waiting on another's lease. The holders get the lease's life, counted from when this waiter
    began (a writer that keeps changing the holder's value must not restart the clock); past it, the waiter gives
    up on the holder (`given_up_on`) and takes the lease itself, so that the fleet still mints once. A holder that
    appeared after the deadline gets half a lease's life first. Past twice the lease's life it mints on its own."""

    started: float
    lease_ttl: float
    holder: str | None = None
    holder_since: float = 0.0
    given_up_on: str | None = None
    first_wait: bool = True
    delay: float = 0.01

    def note_holder(self, holder: str, now: float) -> bool:
        """True when the waiter gives up on `holder` now."""
        if holder != self.holder:
            self.holder, self.holder_since = holder, now
        deadline = self.started + self.lease_ttl + 1
        if holder == self.given_up_on or now <= deadline:
            return False
        grace = max(MIN_POST_DEADLINE_GRACE, self.lease_ttl / 2)
        if self.holder_since <= deadline or now > deadline + grace:
            self.given_up_on = holder
            return True
        return False

    def over(self, now: float) -> bool:
        return now - self.started > 2 * (self.lease_ttl + 1)

    def next_delay(self) -> float:
        self.first_wait = False
        self.delay = min(self.delay * 2, 0.25)
        return self.delay


def _usable(token: CachedToken | None) -> TypeGuard[CachedToken]:
    return token is not None and time.monotonic() < token.refresh_at


def _token_from(value: dict[str, Any]) -> CachedToken | None:
    """Rebuilt on this replica's monotonic clock; None unless every field has its type (a sealed value is
    authenticated, but may come from an older version)."""
    fields = ("username", "token", "expires", "refresh", "expires_at", "permissions")
    if any(name not in value for name in fields):
        return None
    username, token, expires, refresh = value["username"], value["token"], value["expires"], value["refresh"]
    if not (isinstance(username, str) and isinstance(token, str) and token and isinstance(value["expires_at"], str)):
        return None
    if not (isinstance(expires, int | float) and isinstance(refresh, int | float)):
        return None
    permissions = value["permissions"]
    if not isinstance(permissions, dict) or not all(isinstance(v, str) for v in permissions.values()):
        return None
    now_wall, now = time.time(), time.monotonic()
    if not (math.isfinite(expires) and math.isfinite(refresh)) or expires <= now_wall:
        return None
    expires = min(expires, now_wall + MAX_SHARED_LIFETIME)  # authenticated is not the same as plausible
    credential = Credential(username, token, "cached")  # a shared hit is a cached token, on every replica
    return CachedToken(
        minted=credential,
        reused=credential,
        expires_at_wall=value["expires_at"],
        expires=now + (expires - now_wall),
        refresh_at=now + (min(refresh, expires) - now_wall),
        permissions=dict(permissions),
    )


class KeyValueStore(Protocol):
    """What `github_app` keeps its installation ids in: a bounded in-process store, or that plus the fleet's."""

    async def get(self, key: str) -> Any: ...

    async def set(self, key: str, value: Any, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    def clear(self) -> None: ...


StoreFactory = Callable[[int, str], KeyValueStore]


def local_stores(max_entries: int, namespace: str) -> KeyValueStore:
    return BoundedStore(max_entries, namespace)


class TieredStore:
    """The in-process store first (a dictionary hit); on a miss, the shared one, whose answer is kept locally
    for what remains of its TTL. Writes go to both. Values must be JSON: ints and booleans here."""

    def __init__(self, local: BoundedStore, shared: SharedStore, sealer: Sealer, namespace: str) -> None:
        self._local, self._shared, self._sealer = local, shared, sealer
        self._namespace = namespace
        self._prefix = f"kv:{_hashed(namespace)}:"
        self._clearing: set[asyncio.Task[None]] = set()  # held, so that a clear in flight is not collected

    async def get(self, key: str) -> Any:
        value = await self._local.get(key)
        if value is not None:
            return value
        stored = await self._shared.get(self._prefix + _hashed(key))
        opened = self._sealer.open(stored, self._identity(key)) if stored is not None else None
        if opened is None or not isinstance(opened.get("expires"), int | float) or "value" not in opened:
            return None
        remaining = min(opened["expires"] - time.time(), MAX_SHARED_LIFETIME)
        if not remaining > 0 or not isinstance(opened["value"], int | bool):  # `not >`: NaN is no lifetime
            return None
        await self._local.set(key, opened["value"], remaining)
        return opened["value"]

    async def set(self, key: str, value: Any, ttl: float) -> None:
        await self._local.set(key, value, ttl)
        sealed = self._sealer.seal({"value": value, "expires": time.time() + ttl}, self._identity(key))
        await self._shared.put(self._prefix + _hashed(key), sealed, ttl)

    def _identity(self, key: str) -> str:
        """The namespace names the app and what is stored (an installation id, a "not installed" answer): a value
        of one kind, or of another app, is never read as another's."""
        return f"kv:{self._namespace}:{key}"

    async def delete(self, key: str) -> None:
        await self._local.delete(key)
        await self._shared.delete(self._prefix + _hashed(key))

    def clear(self) -> None:
        """A reload: forget locally at once, and in the fleet's store in the background (bounded there)."""
        self._local.clear()
        task = asyncio.get_running_loop().create_task(self._shared.delete_prefix(self._prefix))
        self._clearing.add(task)
        task.add_done_callback(self._clearing.discard)


def tiered_stores(shared: SharedStore, sealer: Sealer) -> StoreFactory:
    def make(max_entries: int, namespace: str) -> KeyValueStore:
        return TieredStore(BoundedStore(max_entries, namespace), shared, sealer, namespace)

    return make
