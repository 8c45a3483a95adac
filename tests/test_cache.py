"""Token cache: hits, single-flight, refresh before expiry, failures never stored, bounded size, careful eviction."""

from __future__ import annotations

import asyncio

import pytest

from proxy.bounded import BoundedStore
from proxy.credentials import CachedToken, Credential
from proxy.credentials.cache import TokenCache
from proxy.single_flight import SingleFlight


class Minter:
    """A token source that counts its calls; `lifetime` is what GitHub would report."""

    def __init__(self, cache: TokenCache, lifetime: float = 3600, delay: float = 0) -> None:
        self.cache, self.lifetime, self.delay = cache, lifetime, delay
        self.calls = 0
        self.fail_with: Exception | None = None

    async def __call__(self) -> CachedToken:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail_with:
            raise self.fail_with
        expires, refresh_at = self.cache.deadlines(self.lifetime)
        token = f"tok-{self.calls}"
        return CachedToken(Credential("x", token, "minted"), Credential("x", token, "cached"), "", expires, refresh_at)


def new_cache(**overrides: float) -> TokenCache:
    settings = {"max_entries": 100, "max_age": 3000.0, "refresh_before": 300.0, **overrides}
    return TokenCache(**settings)  # type: ignore[arg-type]


async def test_second_get_is_a_hit() -> None:
    cache = new_cache()
    mint = Minter(cache)
    first = await cache.get("k", mint)
    second = await cache.get("k", mint)
    assert (first.origin, second.origin) == ("minted", "cached")
    assert first.token == second.token and mint.calls == 1


async def test_concurrent_cold_gets_share_one_mint() -> None:
    cache = new_cache()
    mint = Minter(cache, delay=0.05)
    results = await asyncio.gather(*(cache.get("k", mint) for _ in range(50)))
    assert mint.calls == 1
    assert {r.token for r in results} == {"tok-1"}


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    cache = new_cache()
    mint = Minter(cache, delay=0.05)
    mint.fail_with = RuntimeError("GitHub 500")
    results = await asyncio.gather(*(cache.get("k", mint) for _ in range(5)), return_exceptions=True)
    assert mint.calls == 1 and all(isinstance(r, RuntimeError) for r in results)
    mint.fail_with = None
    assert (await cache.get("k", mint)).token == "tok-2"


async def test_token_is_refreshed_before_it_expires() -> None:
    cache = new_cache(refresh_before=300)
    mint = Minter(cache, lifetime=1)  # shorter than refreshBefore: serves half its life
    await cache.get("k", mint)
    await cache.get("k", mint)
    assert mint.calls == 1
    await asyncio.sleep(0.6)
    assert (await cache.get("k", mint)).token == "tok-2"


async def test_max_age_caps_reuse() -> None:
    cache = new_cache(max_age=0.2)
    mint = Minter(cache)
    await cache.get("k", mint)
    await asyncio.sleep(0.3)
    await cache.get("k", mint)  # still served (valid for an hour), and replaced in the background
    await asyncio.sleep(0.01)
    assert mint.calls == 2
    assert (await cache.get("k", mint)).token == "tok-2"


async def test_due_token_serves_while_one_background_refresh_runs() -> None:
    cache = new_cache(max_age=0.1)
    mint = Minter(cache, lifetime=3600, delay=0.1)
    await cache.get("k", mint)
    await asyncio.sleep(0.15)  # due for refresh, still valid for an hour
    served = await asyncio.gather(*(cache.get("k", mint) for _ in range(10)))
    assert {c.token for c in served} == {"tok-1"}  # nobody waited for GitHub
    await asyncio.sleep(0.15)
    assert mint.calls == 2
    assert (await cache.get("k", mint)).token == "tok-2"


async def test_failed_background_refresh_backs_off_and_keeps_the_valid_token() -> None:
    cache = new_cache(max_age=0.1)
    mint = Minter(cache, lifetime=3600)
    await cache.get("k", mint)
    await asyncio.sleep(0.15)
    mint.fail_with = RuntimeError("GitHub down")
    for _ in range(20):
        assert (await cache.get("k", mint)).token == "tok-1"
        await asyncio.sleep(0.001)
    assert mint.calls == 2  # one failed attempt, then a pause instead of one attempt per request


async def test_evict_drops_only_the_failed_token() -> None:
    cache = new_cache()
    mint = Minter(cache)
    old = await cache.get("k", mint)
    assert not await cache.evict("k", Credential("x", "some-other-token", "cached"))
    assert (await cache.get("k", mint)).token == old.token  # a different token: nothing evicted
    assert await cache.evict("k", old)
    assert (await cache.get("k", mint)).token == "tok-2"


async def test_store_is_bounded_oldest_out() -> None:
    store = BoundedStore(max_entries=3, namespace="test")
    for i in range(5):
        await store.set(f"k{i}", i, ttl=60)
    assert len(store) == 3
    assert [await store.get(f"k{i}") for i in range(5)] == [None, None, 2, 3, 4]


async def test_store_entries_expire_by_ttl() -> None:
    store = BoundedStore(max_entries=3, namespace="test")
    await store.set("k", 1, ttl=0.05)
    await asyncio.sleep(0.1)
    assert await store.get("k") is None


async def test_single_flight_survives_a_cancelled_waiter() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0

    async def slow() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return 7

    impatient = asyncio.create_task(flights.run("k", slow))
    patient = asyncio.create_task(flights.run("k", slow))
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert await patient == 7 and calls == 1
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_side_tables_stay_within_the_bound() -> None:
    cache = new_cache(max_entries=10)
    for i in range(300):
        await cache.get(f"k{i}", Minter(cache))
    assert len(cache._expiries) <= 10
    assert cache.seconds_until_soonest_expiry() > 0


async def test_failed_refresh_pauses_are_bounded_and_forgotten() -> None:
    cache = new_cache(max_entries=5, max_age=0.01)
    for i in range(30):  # each key: a token, then a failed background refresh that leaves a pause behind
        mint = Minter(cache)
        await cache.get(f"k{i}", mint)
        await asyncio.sleep(0.02)  # due for refresh, and still valid for an hour
        mint.fail_with = RuntimeError("GitHub down")
        await cache.get(f"k{i}", mint)
        await asyncio.sleep(0)
    assert len(cache._next_attempt) <= 5
    await asyncio.sleep(0.01)
    await cache.get("k29", mint)
    await asyncio.sleep(0.01)
    assert mint.calls == 2  # paused after the failure: no attempt per request
    cache.forget_failures()  # a reload
    mint.fail_with = None
    assert (await cache.get("k29", mint)).token == "tok-1"  # the old token serves; a refresh starts at once
    await asyncio.sleep(0.01)
    assert mint.calls == 3
    assert (await cache.get("k29", mint)).token == "tok-3"
