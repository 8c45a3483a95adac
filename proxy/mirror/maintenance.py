"""Upkeep of the mirrors in the background: git's own maintenance after fills, LRU eviction, the disk-used gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..metrics import Metrics
from .gitrun import MirrorGit, describe_failure
from .store import MirrorSlot, MirrorStore

log = logging.getLogger("git_token_proxy.mirror")

# A pass runs this often, and also soon after every fill (which is what makes a mirror grow).
MAINTENANCE_INTERVAL_SECONDS = 300.0


class MirrorMaintenance:
    def __init__(self, store: MirrorStore, git: MirrorGit, metrics: Metrics, max_size: int) -> None:
        self._store = store
        self._git = git
        self._metrics = metrics
        self._max_size = max_size
        self._filled: set[str] = set()  # repos fetched into since their last `maintenance run --auto`
        self._wake = asyncio.Event()

    def note_filled(self, slot: MirrorSlot) -> None:
        self._filled.add(slot.key)
        self._wake.set()

    async def run_forever(self) -> None:
        """Never ends on its own and survives any failure: the next pass tries again."""
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("mirror maintenance failed; trying again in %.0f s", MAINTENANCE_INTERVAL_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), MAINTENANCE_INTERVAL_SECONDS)
            self._wake.clear()

    async def run_once(self) -> None:
        await self._store.prepare()
        await self._run_git_maintenance()
        left, evicted = await self._store.evict_to_fit(self._max_size)
        if evicted:
            self._metrics.mirror_evictions.inc(evicted)
        self._metrics.mirror_disk_bytes.set(left)

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
