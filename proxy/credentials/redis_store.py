"""Redis as the fleet's shared store: bounded calls, a circuit breaker, a lease, and compare-and-delete scripts.

redis-py's asyncio client is used directly rather than through aiocache's RedisCache: the lease (`SET NX PX` with
an owner value) and the compare-and-delete scripts need commands that aiocache does not expose, and every call
here needs its own time budget and failure handling.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from ..metrics import Metrics
from .shared import MAX_VALUE, Lease

log = logging.getLogger("git_token_proxy.redis")
T = TypeVar("T")

# After a failed call, Redis is skipped for this long: clones must not pay `connectTimeout` again and again while
# it is away. Then the next call is the probe.
BREAK_FOR = 5.0

# KEYS[1]; ARGV[1]: a new owner value, ARGV[2]: the lease's life in ms, ARGV[3]: a holder to take over from ('' for
# none). Takes the lease when it is free, when what holds it is not a lease of ours (no deadline, a longer one than
# ours, another type, or a value no replica writes), or when the holder given still holds it. Returns {1, owner} when
# taken, {0, holder} when not.
_LEASE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' and redis.call('STRLEN', KEYS[1]) <= 64 then
  local holder = redis.call('GET', KEYS[1])
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 and left <= tonumber(ARGV[2]) and holder ~= ARGV[3] then return {0, holder} end
end
if kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, ARGV[1]}
"""
# KEYS[1]; ARGV[1]: the owner value. Deletes the lease only if this replica still holds it.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# KEYS[1]; ARGV[1]: a tag. Deletes the value only if it still starts with that tag and a dot.
_DELETE_IF_TAGGED = (
    "local v = redis.call('GET', KEYS[1]) "
    "if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '.' then return redis.call('DEL', KEYS[1]) end "
    "return 0"
)


class RedisStore:
    """Implements `shared.SharedStore`. Every call is bounded by `timeout`; any failure opens the breaker and
    answers like an empty store."""

    def __init__(
        self, url: str, key_prefix: str, timeout: float, metrics: Metrics, ca_file: Path | None = None
    ) -> None:
        options: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        if url.startswith("rediss://"):
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            if ca_file is not None:
                options["ssl_ca_certs"] = str(ca_file)
        self._client = redis.Redis.from_url(url, **options)
        self._prefix = f"{key_prefix}:"
        self._timeout = timeout
        self._metrics = metrics
        self._broken_until = 0.0
        self._available = True
        self._unreadable_logged = False
        self.where = redis_location(url)
        metrics.redis_available.set(1)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._broken_until

    # ------------------------------------------------------------ the SharedStore calls

    async def get(self, key: str) -> bytes | None:
        """At most MAX_VALUE bytes cross the network (GETRANGE): a larger value is refused unread, whoever wrote
        it. A key of another type (a hash, a list) is a miss too, not a Redis failure: it must not open the
        breaker, or anyone who can write to Redis could switch the fleet's sharing off."""
        try:
            value = await self._call(self._client.getrange(self._prefix + key, 0, MAX_VALUE), None, miss=ResponseError)
        except ResponseError:
            self._note_unreadable("a value of another type than a string")
            return None
        if not isinstance(value, bytes) or not value:
            return None  # GETRANGE answers a missing key with an empty string
        if len(value) > MAX_VALUE:
            self._note_unreadable(f"a value over {MAX_VALUE} bytes")
            return None
        return value

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(self._client.set(self._prefix + key, value, px=max(1, int(ttl * 1000))), None)

    async def delete(self, key: str, tag: bytes | None = None) -> bool:
        if tag is None:
            return bool(await self._call(self._client.delete(self._prefix + key), 0))
        script = cast(Awaitable[int], self._client.eval(_DELETE_IF_TAGGED, 1, self._prefix + key, tag))
        return bool(await self._call(script, 0))

    async def delete_prefix(self, prefix: str) -> None:
        async def scan_and_delete() -> None:
            batch: list[bytes] = []
            async for key in self._client.scan_iter(match=f"{self._prefix}{prefix}*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    await self._client.unlink(*batch)
                    batch = []
            if batch:
                await self._client.unlink(*batch)

        await self._call(scan_and_delete(), None, budget=max(self._timeout, 10.0))

    async def lease(self, key: str, ttl: float, take_from: str | None = None) -> Lease:
        owner = secrets.token_hex(16)
        script = self._client.eval(_LEASE, 1, self._prefix + key, owner, max(1, int(ttl * 1000)), take_from or "")
        answer = await self._call(cast(Awaitable[list[Any]], script), None)
        if not isinstance(answer, list) or len(answer) != 2 or not isinstance(answer[1], bytes):
            return Lease()
        taken, value = answer[0] == 1, answer[1].decode(errors="replace")
        return Lease(owner=value) if taken else Lease(holder=value)

    async def release(self, key: str, owner: str) -> None:
        await self._call(cast(Awaitable[int], self._client.eval(_RELEASE, 1, self._prefix + key, owner)), None)

    async def ping(self) -> None:
        """For `check`: raises what went wrong instead of failing soft."""
        async with asyncio.timeout(self._timeout):
            await self._client.ping()  # type: ignore[misc]

    async def close(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------ bounds and the breaker

    async def _call(
        self, call: Awaitable[T], failed: T, budget: float | None = None, miss: type[RedisError] | None = None
    ) -> T:
        """`miss`: an error that is an answer about one key, not a failure of Redis; raised to the caller."""
        if not self.available:
            _close_unawaited(call)
            return failed
        try:
            async with asyncio.timeout(budget or self._timeout):
                result = await call
        except (RedisError, OSError, TimeoutError) as error:
            if miss is not None and isinstance(error, miss):
                self._mend()
                raise
            self._break(error)
            return failed
        self._mend()
        return result

    def _note_unreadable(self, what: str) -> None:
        if not self._unreadable_logged:
            self._unreadable_logged = True
            log.warning("Redis at %s holds %s under a key of ours: a miss, replaced (logged once)", self.where, what)

    def _break(self, error: BaseException) -> None:
        self._broken_until = time.monotonic() + BREAK_FOR
        self._metrics.shared_cache_errors.inc()
        if self._available:  # one line per change of state, not one per request
            self._available = False
            self._metrics.redis_available.set(0)
            log.warning(
                "Redis at %s is unavailable (%s); each replica serves from its own cache, trying again every %.0f s",
                self.where, _describe(error), BREAK_FOR,
            )  # fmt: skip

    def _mend(self) -> None:
        if not self._available:
            self._available = True
            self._metrics.redis_available.set(1)
            log.info("Redis at %s is available again; the fleet shares its tokens again", self.where)


def redis_location(url: str) -> str:
    """host:port/db, or the socket path: what a log line may say of a Redis URL (never its password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


def _close_unawaited(call: Awaitable[Any]) -> None:
    close = getattr(call, "close", None)  # a coroutine never awaited would warn when collected
    if close is not None:
        close()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__
