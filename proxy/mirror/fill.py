"""Filling a mirror from upstream: a whole fetch the first time, `fetch --prune` later (the refs are upstream's of
now); one flight per repo."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..bounded import BoundedDict
from ..credentials import Credential
from ..metrics import Metrics
from .gitrun import MirrorGit, describe_failure
from .snapshots import RestoredSnapshot, Snapshots
from .store import MirrorSlot, MirrorStore

log = logging.getLogger("git_token_proxy.mirror")

# Every ref, as `clone --mirror` takes them: a client may want any commit upstream advertised to it.
MIRROR_REFSPEC = "+refs/*:refs/*"
# After a fetch fails, the mirror is checked with fsck unless a check passed this recently: an upstream that
# refuses for an hour must not cost a full connectivity walk per request.
CHECK_PAUSE_SECONDS = 600.0

REFILL_PAUSE = 5.0  # after a sync that lacked wanted objects, requests lacking objects go upstream this long
# After upstream failed the fetch behind a restored snapshot, the repo's next first fills start from nothing for this
# long: an upstream that fails (or throttles packs) costs one snapshot download and index-pack per pause, not one per
# request. Filling from nothing is what a replica without snapshots does.
RESTORE_PAUSE = 300.0

T = TypeVar("T")


@dataclass(frozen=True)
class _Flight:
    task: asyncio.Task[bool]
    started: float  # time.monotonic()


class MirrorFiller:
    """Brings mirrors in line with upstream: the first time a whole fetch, later `fetch --prune`, so that the
    mirror's refs are upstream's. Concurrent requests for one repo share one fetch (`asyncio.shield`: a client
    that goes away never cancels the fetch the others wait for); different repos fetch in parallel."""

    def __init__(
        self, store: MirrorStore, git: MirrorGit, metrics: Metrics, on_filled: Callable[[MirrorSlot], None],
        on_unclean: Callable[[MirrorSlot], None], snapshots: Snapshots | None = None,
    ) -> None:  # fmt: skip
        self._snapshots = snapshots
        self._store = store
        self._git = git
        self._metrics = metrics
        self._on_filled = on_filled
        self._on_unclean = on_unclean
        self._flights: dict[str, _Flight] = {}
        self._short_at: BoundedDict[str, float] = BoundedDict(10_000)  # mirror key -> when a sync came up short
        self._wasted_restore_at: BoundedDict[str, float] = BoundedDict(10_000)  # -> when a fetch failed behind one
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._passed_check_at: dict[str, float] = {}

    async def sync(self, slot: MirrorSlot, url: str, credential: Credential | None, arrived: float) -> bool:
        """The mirror with upstream's refs as they are now: from a fetch that started after `arrived` (when the
        request came, which is after its client read upstream's refs). A fetch under way that started earlier
        may predate a force-push the client saw, so it is waited out, and a newer one shared or started: a
        burst of requests costs at most two fetches. False when the fetch failed (the request goes upstream)."""
        while True:
            flight = self._flights.get(slot.key)
            if flight is None or flight.task.done():
                flight = self._start(slot, url, credential)
            if flight.started >= arrived:
                return await _shared(flight.task, False)
            await _shared(flight.task, False)  # too old for this request: wait it out, then one of its own

    def note_short(self, slot: MirrorSlot) -> None:
        """A sync just now did not bring what its request wanted (ids upstream's refs do not reach)."""
        self._short_at[slot.key] = time.monotonic()

    def came_up_short_lately(self, slot: MirrorSlot) -> bool:
        """Until REFILL_PAUSE has passed, a request whose wants the mirror lacks goes upstream without a sync of
        its own: a client sending ids upstream lacks costs one sync per pause, not one per request."""
        short_at = self._short_at.get(slot.key)
        return short_at is not None and time.monotonic() - short_at < REFILL_PAUSE

    def _start(self, slot: MirrorSlot, url: str, credential: Credential | None) -> _Flight:
        task = asyncio.create_task(self._fill(slot, url, credential), name=f"mirror fill {slot.key}")
        flight = self._flights[slot.key] = _Flight(task, time.monotonic())
        task.add_done_callback(functools.partial(_forget_flight, self._flights, slot.key, flight))
        return flight

    async def _fill(self, slot: MirrorSlot, url: str, credential: Credential | None) -> bool:
        authorization = credential.authorization if credential is not None else None
        async with slot.lock:
            try:
                if await self._store.exists(slot):
                    filled = await self._refresh(slot, url, authorization)
                else:
                    filled = await self._create(slot, url, authorization)
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

    async def _create(self, slot: MirrorSlot, url: str, authorization: str | None) -> bool:
        """Built under a temporary name and renamed once whole: a crash leaves no half mirror under the real one.
        With snapshots, it starts from the fleet's newest one, then fetches from upstream with the credential as
        without: no mirror is installed unless upstream answered that fetch."""
        incoming = await self._store.incoming_path(slot)
        try:
            snapshots = self._snapshots if self._may_restore(slot) else None
            restored = await snapshots.restore(slot.key, incoming) if snapshots is not None else None
            done = await self._git.init_bare(incoming) if restored is None else None
            if done is None or done.returncode == 0:
                done = await self._git.fetch(incoming, url, [MIRROR_REFSPEC], authorization, prune=True)
            if done.returncode != 0:
                log.warning("mirror of %s: first fetch from %s failed (%s)", slot.key, url, describe_failure(done))
                if restored is not None:
                    self._wasted_restore_at[slot.key] = time.monotonic()
                return False
            clean = await self._is_clean_after(incoming, restored)
            if clean:
                await self._store.mark_clean(incoming)
            await self._store.install(incoming, slot)
            if not clean:
                self._on_unclean(slot)  # pruned in the background; until then each want is checked
            log.info("mirror of %s created from %s%s", slot.key, url, " and a snapshot" if restored else "")
            return True
        finally:
            await self._store.discard(incoming)  # nothing left once installed

    def _may_restore(self, slot: MirrorSlot) -> bool:
        wasted_at = self._wasted_restore_at.get(slot.key)
        return wasted_at is None or time.monotonic() - wasted_at >= RESTORE_PAUSE

    async def _is_clean_after(self, incoming: Path, restored: RestoredSnapshot | None) -> bool:
        """A fresh fetch holds only what the refs reach. So does a restored snapshot if its pack held only what its
        refs reached and upstream's refs of now still reach all of those (nothing it had was rewound away)."""
        if restored is None:
            return True
        return restored.clean and await self._git.all_reachable(incoming, restored.tips)

    async def _refresh(self, slot: MirrorSlot, url: str, authorization: str | None) -> bool:
        stale = await self._store.clear_stale_locks(slot)
        if stale:
            log.warning("mirror of %s: removed lock files left by an interrupted git: %s", slot.key, ", ".join(stale))
        before = await self._git.ref_tips(slot.path) if await self._store.is_clean(slot) else None
        done = await self._git.fetch(slot.path, url, [MIRROR_REFSPEC], authorization, prune=True)
        if done.returncode != 0:
            log.warning("mirror of %s: fetch from %s failed (%s)", slot.key, url, describe_failure(done))
            self.schedule_check(slot)  # runs after this fill lets go of the lock; waiters go upstream meanwhile
            return False
        if before is not None and not await self._git.all_reachable(slot.path, before):
            # A ref was rewound or deleted: what it alone reached is still here, and must not be served as if
            # upstream still had it. Pruned in the background (maintenance); until then only reachability counts.
            await self._store.mark_unclean(slot)
            self._on_unclean(slot)
        return True

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
        tasks = [*(flight.task for flight in self._flights.values()), *self._checks.values()]
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


def _forget_flight(flights: dict[str, _Flight], key: str, flight: _Flight, _: asyncio.Task[bool]) -> None:
    if flights.get(key) is flight:
        del flights[key]
