"""Single flight: concurrent callers for one key (a token to mint, an owner to look up) share one call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


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
