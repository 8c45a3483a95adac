"""Bounded in-process tables: at most so many entries, the least recently set out first, whatever a client varies."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from aiocache import SimpleMemoryCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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
        # aiocache holds the values and their TTLs. SimpleMemoryCache has no bound on its size, and shows its keys
        # only through `raw` (async, and the memory backend's alone): these keys, in the order they were set, are
        # what the bound evicts from, oldest first.
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
