"""Backoff: how soon GitHub may be asked again after something went wrong, per key, in tables that stay bounded."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..bounded import BoundedDict
from . import Credential

Clock = Callable[[], float]

# A heal whose fresh token is rejected too waits this long before the next one, doubling while it goes on.
FIRST_HEAL_PAUSE = 30.0
MAX_HEAL_PAUSE = 900.0


@dataclass
class _HealState:
    pause: float = FIRST_HEAL_PAUSE
    last_heal: float | None = None  # None: no heal since the last suspension (the next 401 may heal again)
    healed_from: str = ""  # fingerprint of the token the last heal evicted
    suspended_until: float = 0.0


class HealBackoff:
    """Bounds heals per token key (entry, installation, scope). One heal is free. If the token it minted is
    rejected as well within the pause, the upstream rejects good tokens (a 401-everything upstream, or one repo
    that refuses any token): no heal for the pause, which doubles each time, up to 15 minutes. So a stream of 401s
    costs one mint per pause instead of one per request, and one bad repo cannot keep replacing the token that
    every other repo of the installation uses."""

    def __init__(self, max_entries: int, clock: Clock = time.monotonic) -> None:
        self._states: BoundedDict[str, _HealState] = BoundedDict(max_entries)
        self._clock = clock

    def suspended_for(self, key: str, rejected: Credential) -> float:
        """Seconds before `rejected` may be replaced; 0 when a heal may go ahead now."""
        state, now = self._states.get(key), self._clock()
        if state is None:
            return 0.0
        if now < state.suspended_until:
            return state.suspended_until - now
        fresh_token_rejected = rejected.fingerprint != state.healed_from
        if state.last_heal is not None and fresh_token_rejected and now - state.last_heal < state.pause:
            state.suspended_until, state.last_heal = now + state.pause, None
            state.pause = min(state.pause * 2, MAX_HEAL_PAUSE)
            return state.suspended_until - now
        return 0.0

    def healed(self, key: str, evicted: Credential) -> None:
        """A heal happened: `evicted` left the cache, and the next request mints."""
        state, now = self._states.get(key) or _HealState(), self._clock()
        if state.last_heal is not None and now - state.last_heal >= state.pause:
            state.pause = FIRST_HEAL_PAUSE  # the previous heal's token served a whole pause: healing works again
        state.last_heal, state.healed_from = now, evicted.fingerprint
        self._states[key] = state

    def clear(self) -> None:
        self._states.clear()


@dataclass
class _Pause:
    until: float
    length: float
    reason: str


class Pauses:
    """After a failure that retrying at once would only repeat, nothing for `first` seconds, doubling up to `cap`
    while the failures go on; a success or `clear()` ends it."""

    def __init__(self, max_entries: int, first: float, cap: float, clock: Clock = time.monotonic) -> None:
        self._pauses: BoundedDict[str, _Pause] = BoundedDict(max_entries)
        self._first, self._cap, self._clock = first, cap, clock

    def current(self, key: str) -> tuple[float, str] | None:
        """(seconds left, why) while `key` is paused."""
        pause = self._pauses.get(key)
        now = self._clock()
        return (pause.until - now, pause.reason) if pause is not None and now < pause.until else None

    def failed(self, key: str, reason: str) -> None:
        previous, now = self._pauses.get(key), self._clock()
        # Failures that follow one another double the pause; one long after the last starts afresh.
        going_on = previous is not None and now - previous.until < previous.length
        length = min(previous.length * 2, self._cap) if previous is not None and going_on else self._first
        self._pauses[key] = _Pause(now + length, length, reason)

    def succeeded(self, key: str) -> None:
        self._pauses.pop(key, None)

    def clear(self) -> None:
        self._pauses.clear()


class CallBudget:
    """At most `per_minute` calls per key in any 60 s: a cap on what failures that are never cached can cost."""

    def __init__(self, max_entries: int, per_minute: int, clock: Clock = time.monotonic) -> None:
        self._calls: BoundedDict[str, deque[float]] = BoundedDict(max_entries)
        self._per_minute, self._clock = per_minute, clock

    def take(self, key: str) -> float:
        """0 and the call is counted; otherwise the seconds until one is allowed again."""
        now = self._clock()
        calls = self._calls.get(key) or deque(maxlen=self._per_minute)
        if len(calls) == self._per_minute and now - calls[0] < 60:
            return 60 - (now - calls[0])
        calls.append(now)
        self._calls[key] = calls
        return 0.0

    def clear(self) -> None:
        self._calls.clear()
