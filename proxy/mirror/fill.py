"""Filling a mirror from upstream: a whole fetch the first time, `fetch --prune` later; one flight per repo."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ..credentials import Credential
from ..credentials.cache import BoundedDict
from ..metrics import Metrics
from .gitrun import MirrorGit, describe_failure
from .store import MirrorSlot, MirrorStore

log = logging.getLogger("git_token_proxy.mirror")

# Every ref, as `clone --mirror` takes them: a client may want any commit upstream advertised to it.
MIRROR_REFSPEC = "+refs/*:refs/*"
# After a fetch fails, the mirror is checked with fsck unless a check passed this recently: an upstream that
# refuses for an hour must not cost a full connectivity walk per request.
CHECK_PAUSE_SECONDS = 600.0

T = TypeVar("T")


UNOBTAINABLE_FOR = 60.0  # how long a want that upstream did not send is not fetched for again
REFILL_PAUSE = 5.0  # after a fetch that lacked wanted objects, the next waits this long (requests go upstream)


class MirrorFiller:
    """Fetches into mirrors. Concurrent requests for one repo share one fetch (`asyncio.shield`: a client that goes
    away never cancels the fetch the others wait for); different repos fetch in parallel."""

    def __init__(
        self, store: MirrorStore, git: MirrorGit, metrics: Metrics, on_filled: Callable[[MirrorSlot], None]
    ) -> None:
        self._store = store
        self._git = git
        self._metrics = metrics
        self._on_filled = on_filled
        self._flights: dict[str, asyncio.Task[bool]] = {}
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._passed_check_at: dict[str, float] = {}
        # (mirror, object id) -> when our own fetch did not bring it: client-driven, so bounded.
        self._unobtainable: BoundedDict[tuple[str, str], float] = BoundedDict(10_000)
        self._short_at: BoundedDict[str, float] = BoundedDict(10_000)  # mirror key -> when a fetch came up short

    async def fill(self, slot: MirrorSlot, wants: Sequence[str], url: str, credential: Credential | None) -> bool:
        """Fetch until the mirror holds every want; False when it cannot (the request then goes upstream)."""
        if wants and all(self._unobtainable_lately(slot.key, want) for want in wants):
            return False  # upstream did not send these a moment ago: no second round of fetches for them
        if not self._in_flight(slot) and self._came_up_short_lately(slot.key):
            # A fetch moments ago did not bring what its client wanted: until the pause ends, requests with
            # missing wants go upstream, so a client sending ids upstream lacks costs one fetch per pause, not
            # several per request. A fetch that brought everything sets no pause (a push, then a clone).
            return False
        for _ in range(2):
            flight, joined = self._flight(slot, wants, url, credential)
            if not await _shared(flight, False):
                return False
            missing = await self._git.missing_objects(slot.path, wants)
            if not missing:
                return True
            if not joined:
                # Our own fetch asked for these very objects, and upstream did not send them. Remembered a while,
                # so that a client asking again and again for ids upstream lacks costs no fetch each time.
                now = time.monotonic()
                for want in missing:
                    self._unobtainable[(slot.key, want)] = now
                self._short_at[slot.key] = now
                return False
            # The fetch we joined started before our client saw upstream's refs: one more, of our own.
        return False

    def _came_up_short_lately(self, key: str) -> bool:
        short_at = self._short_at.get(key)
        return short_at is not None and time.monotonic() - short_at < REFILL_PAUSE

    def _in_flight(self, slot: MirrorSlot) -> bool:
        flight = self._flights.get(slot.key)
        return flight is not None and not flight.done()

    def _unobtainable_lately(self, key: str, want: str) -> bool:
        seen = self._unobtainable.get((key, want))
        return seen is not None and time.monotonic() - seen < UNOBTAINABLE_FOR

    def _flight(
        self, slot: MirrorSlot, wants: Sequence[str], url: str, credential: Credential | None
    ) -> tuple[asyncio.Task[bool], bool]:
        flight = self._flights.get(slot.key)
        if flight is not None and not flight.done():
            return flight, True
        flight = asyncio.create_task(self._fill(slot, tuple(wants), url, credential), name=f"mirror fill {slot.key}")
        self._flights[slot.key] = flight
        flight.add_done_callback(functools.partial(_forget, self._flights, slot.key))
        return flight, False

    async def _fill(self, slot: MirrorSlot, wants: Sequence[str], url: str, credential: Credential | None) -> bool:
        authorization = credential.authorization if credential is not None else None
        async with slot.lock:
            try:
                if await self._store.exists(slot):
                    filled = await self._refresh(slot, wants, url, authorization)
                else:
                    filled = await self._create(slot, wants, url, authorization)
            except OSError as error:  # disk full, a permission: the request goes upstream, the clone never fails
                log.warning("mirror of %s could not be filled: %s", slot.key, error)
                filled = False
            except Exception:  # a bug: still only a bypass for the requests waiting on this fill
                log.exception("mirror of %s: fill failed unexpectedly", slot.key)
                filled = False
        self._metrics.mirror_fetches.labels("ok" if filled else "failed").inc()
        if filled:
            self._on_filled(slot)
        return filled

    async def _create(self, slot: MirrorSlot, wants: Sequence[str], url: str, authorization: str | None) -> bool:
        """Built under a temporary name and renamed once whole: a crash leaves no half mirror under the real one."""
        incoming = await self._store.incoming_path(slot)
        try:
            done = await self._git.init_bare(incoming)
            if done.returncode == 0:
                done = await self._git.fetch(incoming, url, [MIRROR_REFSPEC], authorization, prune=True)
            if done.returncode != 0:
                log.warning("mirror of %s: first fetch from %s failed (%s)", slot.key, url, describe_failure(done))
                return False
            await self._fetch_unadvertised(incoming, slot, wants, url, authorization)
            await self._store.install(incoming, slot)
            log.info("mirror of %s created from %s", slot.key, url)
            return True
        finally:
            await self._store.discard(incoming)  # nothing left once installed

    async def _refresh(self, slot: MirrorSlot, wants: Sequence[str], url: str, authorization: str | None) -> bool:
        stale = await self._store.clear_stale_locks(slot)
        if stale:
            log.warning("mirror of %s: removed lock files left by an interrupted git: %s", slot.key, ", ".join(stale))
        done = await self._git.fetch(slot.path, url, [MIRROR_REFSPEC], authorization, prune=True)
        if done.returncode != 0:
            log.warning("mirror of %s: fetch from %s failed (%s)", slot.key, url, describe_failure(done))
            self.schedule_check(slot)  # runs after this fill lets go of the lock; waiters go upstream meanwhile
            return False
        await self._fetch_unadvertised(slot.path, slot, wants, url, authorization)
        return True

    async def _fetch_unadvertised(
        self, mirror: Path, slot: MirrorSlot, wants: Sequence[str], url: str, authorization: str | None
    ) -> None:
        """Wants that no ref reaches any more (a force-push since the client's ls-refs) or never did (a fetch by
        commit id): asked for by id. Such objects have no ref here; gc keeps them for its prune expiry."""
        missing = await self._git.missing_objects(mirror, wants)
        if not missing:
            return
        done = await self._git.fetch(mirror, url, sorted(missing), authorization, prune=False)
        if done.returncode != 0:
            log.info("mirror of %s: upstream did not send %d wanted objects (%s)", slot.key, len(missing),
                     describe_failure(done))  # fmt: skip

    # ------------------------------------------------------------ integrity

    def schedule_check(self, slot: MirrorSlot) -> None:
        """Check the mirror with fsck after something failed on it; a broken one is moved aside, to be rebuilt by
        the next request. Queued behind whatever holds the repo's lock."""
        if slot.key in self._checks:
            return
        passed_at = self._passed_check_at.get(slot.key)
        if passed_at is not None and time.monotonic() - passed_at < CHECK_PAUSE_SECONDS:
            return
        log.info("mirror of %s: checking it (fsck) after a failure that looks like corruption", slot.key)
        check = asyncio.create_task(self._check(slot), name=f"mirror check {slot.key}")
        self._checks[slot.key] = check
        check.add_done_callback(functools.partial(_forget, self._checks, slot.key))

    async def wait_for_check(self, slot: MirrorSlot) -> None:
        """A request waits for a check under way, so that it never serves from a mirror about to be moved aside."""
        check = self._checks.get(slot.key)
        if check is not None:
            await _shared(check, None)

    async def _check(self, slot: MirrorSlot) -> None:
        async with slot.lock:
            try:
                if not await self._store.exists(slot):
                    return
                if await self._git.is_connected(slot.path):
                    self._passed_check_at[slot.key] = time.monotonic()
                    return
                log.warning("mirror of %s is broken (fsck --connectivity-only failed): moved aside, to be rebuilt",
                            slot.key)  # fmt: skip
                self._passed_check_at.pop(slot.key, None)
                await self._store.move_aside(slot)
            except Exception:  # a check that fails leaves things as they were; the next failure checks again
                log.exception("mirror of %s: integrity check failed", slot.key)

    async def close(self) -> None:
        tasks = [*self._flights.values(), *self._checks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _shared(task: asyncio.Task[T], if_cancelled: T) -> T:
    """Await a task others share: our own cancellation (a client gone) leaves it running; its cancellation
    (shutdown) gives `if_cancelled` instead of an exception."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and (current is None or not current.cancelling()):
            return if_cancelled
        raise


def _forget(tasks: dict[str, asyncio.Task[T]], key: str, task: asyncio.Task[T]) -> None:
    if tasks.get(key) is task:
        del tasks[key]
