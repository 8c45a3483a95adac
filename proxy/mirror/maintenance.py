"""Upkeep of the mirrors in the background: git's own maintenance after fills, LRU eviction, the disk-used gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..metrics import Metrics
from .gitrun import MirrorGit, describe_failure
from .store import MirrorSlot, MirrorStore

log = logging.getLogger("git_token_proxy.mirror")

# A pass runs this often, and also soon after every fill (which is what makes a mirror grow).
MAINTENANCE_INTERVAL_SECONDS = 300.0
PRUNE_PAUSE = 600.0  # the least time between two prunes of one repo (a prune rewrites its packs)
PRUNE_RETRY = 5.0  # a prune put off because its repo was busy is tried again this soon


class MirrorMaintenance:
    def __init__(self, store: MirrorStore, git: MirrorGit, metrics: Metrics, max_size: int) -> None:
        self._store = store
        self._git = git
        self._metrics = metrics
        self._max_size = max_size
        self._filled: set[str] = set()  # repos fetched into since their last `maintenance run --auto`
        self._unclean: set[str] = set()  # repos that may hold objects no ref reaches, to be pruned
        self._pruned_at: dict[str, float] = {}
        self._wake = asyncio.Event()

    def note_filled(self, slot: MirrorSlot) -> None:
        self._filled.add(slot.key)
        self._wake.set()

    def note_unclean(self, slot: MirrorSlot) -> None:
        """Woken once per repo: a pass that finds the repo busy tries again PRUNE_RETRY later (run_forever)."""
        if slot.key not in self._unclean:
            self._unclean.add(slot.key)
            self._wake.set()

    async def run_forever(self) -> None:
        """Never ends on its own and survives any failure: the next pass tries again. A full pass runs every
        interval and when woken (a fill); a prune put off because its repo was busy is tried again alone, soon."""
        full_pass_at = 0.0
        while True:
            try:
                if self._wake.is_set() or time.monotonic() >= full_pass_at:
                    self._wake.clear()
                    full_pass_at = time.monotonic() + MAINTENANCE_INTERVAL_SECONDS
                    await self.run_once()
                else:
                    await self._prune_unclean()
            except Exception:
                log.exception("mirror maintenance failed; trying again in %.0f s", MAINTENANCE_INTERVAL_SECONDS)
            wait = full_pass_at - time.monotonic()
            if self._prunes_due():
                wait = min(wait, PRUNE_RETRY)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))

    async def run_once(self) -> None:
        await self._store.prepare()
        await self._prune_unclean()
        await self._run_git_maintenance()
        left, evicted = await self._store.evict_to_fit(self._max_size)
        if evicted:
            self._metrics.mirror_evictions.inc(evicted)
        self._metrics.mirror_disk_bytes.set(left)

    def _prunes_due(self) -> bool:
        """A repo waits to be pruned that is not in its pause after a prune."""
        now = time.monotonic()
        return any(now - self._pruned_at.get(key, -PRUNE_PAUSE) >= PRUNE_PAUSE for key in self._unclean)

    async def _prune_unclean(self) -> None:
        """Mirrors whose refs were rewound are pruned to what their refs reach, so that blob and tree wants are
        served from them again. A prune rewrites the packs: at most once per PRUNE_PAUSE per repo, and put off,
        like maintenance, while the repo is being read."""
        now = time.monotonic()
        for key in sorted(self._unclean):
            slot = self._store.slot(key)
            if slot.readers or slot.lock.locked() or now - self._pruned_at.get(key, -PRUNE_PAUSE) < PRUNE_PAUSE:
                continue  # next pass
            self._pruned_at[key] = now
            async with slot.lock:
                self._unclean.discard(key)
                if not await self._store.exists(slot) or await self._store.is_clean(slot):
                    continue
                done = await self._git.prune_unreachable(slot.path)
                if done.returncode != 0:
                    log.warning("mirror of %s: pruning unreachable objects failed (%s)", key, describe_failure(done))
                    continue
                await self._store.mark_clean(slot.path)
                log.info("mirror of %s: pruned to what its refs reach", key)

    async def _run_git_maintenance(self) -> None:
        """`git maintenance run --auto` (gc --auto: repack when packs pile up) on repos that were fetched into,
        under the repo's lock, and put off while the repo is being read: git keeps readers correct through a
        repack, but a reader whose pack disappears has to look again, which is work better done at a quiet time."""
        for key in sorted(self._filled):
            slot = self._store.slot(key)
            if slot.readers or slot.lock.locked():
                continue  # next pass
            async with slot.lock:
                if await self._store.exists(slot):
                    done = await self._git.maintain(slot.path)
                    if done.returncode != 0:
                        log.warning("mirror of %s: git maintenance failed (%s)", key, describe_failure(done))
            self._filled.discard(key)
