"""The mirrors on disk: a bare repo per host/owner/repo under `mirror.dir`, who is reading which, and the LRU bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("git_token_proxy.mirror")

# Touched whenever a mirror serves, so that least-recently-used survives a restart. Inside the bare repo, where
# git never looks.
LAST_USED_MARK = "git-token-proxy-last-used"
# Present while the mirror holds only objects its refs reach: made so (a fresh fetch), kept so by fast-forwards, lost
# when a refresh rewinds or deletes a ref, made so again by a prune. Then an object's presence says that upstream's
# refs reached it at the last refresh; without the mark, only commits and tags are checked (a blob or tree want goes
# upstream). A mirror made by an older version has no mark: unclean until pruned.
CLEAN_MARK = "git-token-proxy-clean"
# A lock file this old belongs to a git that died (ours, killed mid-fetch, or a crashed process): git holds its
# ref and packed-refs locks for milliseconds. Younger ones may belong to another process sharing the directory.
STALE_LOCK_SECONDS = 60.0
_INCOMING = "-incoming-"  # a mirror being created is `<name>.git-incoming-<random>` until it is complete
_TOP_LEVEL_LOCKS = ("packed-refs.lock", "shallow.lock", "config.lock", "HEAD.lock")
_PART = re.compile(r"^[a-z0-9._:-]{1,100}$")  # what routing lets through, lower-cased (`.github` is a repo name)


@dataclass(eq=False)
class MirrorSlot:
    """One repo's mirror and its state in this process."""

    key: str  # host/owner/repo, lower case: GitHub names are case-insensitive, so Acme/App and acme/app share one
    path: Path
    # Held by whatever changes the mirror (fill, maintenance, move-aside, eviction); readers never take it:
    # git's own object and ref locking keeps reads correct while a fetch writes.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    readers: int = 0  # requests being served from it: eviction passes it by while this is above zero
    evicting: bool = False
    last_used: float = 0.0


@dataclass(frozen=True)
class MirrorOnDisk:
    key: str
    path: Path
    size: int
    last_used: float


class MirrorStore:
    """Paths and bookkeeping only; git itself runs elsewhere. Nothing touches the disk until `prepare`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos_dir = root / "repos"
        self.home = root / "home"  # git's HOME: empty, ours alone
        self._trash_dir = root / "trash"
        self._slots: dict[str, MirrorSlot] = {}
        self._prepared: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ layout

    @staticmethod
    def key_of(matched: str) -> str | None:
        """host/owner/name for the repo as routing matched it (`Route.matched`). A baseUrl path, or an anonymous
        path deeper than owner/repo, folds into the owner level joined by `+`, which no path segment can hold: one
        mirror per upstream repo, never shared between `host/team-a/acme/app` and `host/team-b/acme/app`."""
        parts = matched.lower().split("/")
        if len(parts) < 3 or not all(_PART.match(part) and part not in (".", "..") for part in parts):
            return None  # routing refuses such names already; a path outside the root must be impossible here too
        return "/".join((parts[0], "+".join(parts[1:-1]), parts[-1]))

    def slot(self, key: str) -> MirrorSlot:
        slot = self._slots.get(key)
        if slot is None:
            host, owner, name = key.split("/")
            slot = self._slots[key] = MirrorSlot(key, self.repos_dir / host / owner / f"{name}.git")
        return slot

    async def prepare(self) -> None:
        """Create the directories and clear what a previous process left half done; once, shared by all callers."""
        if self._prepared is None or (self._prepared.done() and self._prepared.exception() is not None):
            self._prepared = asyncio.ensure_future(asyncio.to_thread(self._prepare_on_disk))
        await asyncio.shield(self._prepared)

    def _prepare_on_disk(self) -> None:
        for directory in (self.repos_dir, self.home, self._trash_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._trash_dir, ignore_errors=True)
        self._trash_dir.mkdir(exist_ok=True)
        for entry in self.repos_dir.glob("*/*/*"):
            if not entry.name.endswith(".git"):  # `<name>.git-incoming-…`: a first fill that never finished
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------ readers

    def start_reading(self, slot: MirrorSlot) -> bool:
        """False while the mirror is being evicted: the request then goes upstream."""
        if slot.evicting:
            return False
        slot.readers += 1
        slot.last_used = time.time()
        return True

    def stop_reading(self, slot: MirrorSlot) -> None:
        slot.readers -= 1

    async def mark_used(self, slot: MirrorSlot) -> None:
        await asyncio.to_thread(_touch, slot.path / LAST_USED_MARK)

    async def is_clean(self, slot: MirrorSlot) -> bool:
        """True when the mirror is known to hold only objects its refs reach (see CLEAN_MARK)."""
        return await asyncio.to_thread((slot.path / CLEAN_MARK).is_file)

    async def mark_clean(self, path: Path) -> None:
        await asyncio.to_thread(_touch, path / CLEAN_MARK)

    async def mark_unclean(self, slot: MirrorSlot) -> None:
        await asyncio.to_thread((slot.path / CLEAN_MARK).unlink, True)

    # ------------------------------------------------------------ changes (callers hold slot.lock)

    async def exists(self, slot: MirrorSlot) -> bool:
        return await asyncio.to_thread((slot.path / "HEAD").is_file)

    async def incoming_path(self, slot: MirrorSlot) -> Path:
        """Where a new mirror is built; `install` gives it its final name only once it is complete."""
        await asyncio.to_thread(slot.path.parent.mkdir, parents=True, exist_ok=True)
        return slot.path.with_name(f"{slot.path.name}{_INCOMING}{secrets.token_hex(6)}")

    async def install(self, incoming: Path, slot: MirrorSlot) -> None:
        await asyncio.to_thread(incoming.rename, slot.path)

    async def discard(self, path: Path) -> None:
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def move_aside(self, slot: MirrorSlot) -> None:
        """Out of the way at once (one rename), deleted afterwards: the next fill starts from nothing."""
        await asyncio.to_thread(self._move_aside_on_disk, slot.path)

    def _move_aside_on_disk(self, path: Path) -> None:
        self._trash_dir.mkdir(parents=True, exist_ok=True)
        aside = self._trash_dir / secrets.token_hex(8)
        try:
            path.rename(aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    async def clear_stale_locks(self, slot: MirrorSlot) -> list[str]:
        """Lock files left by a git that was killed: git would refuse every later fetch while they exist."""
        return await asyncio.to_thread(_clear_stale_locks, slot.path, time.time() - STALE_LOCK_SECONDS)

    # ------------------------------------------------------------ size and eviction

    async def scan(self) -> list[MirrorOnDisk]:
        mirrors = await asyncio.to_thread(self._scan_on_disk)
        # What this process saw last beats what the disk remembers (the mark is touched after serving starts).
        return [replace(m, last_used=max(m.last_used, self._seen_last(m.key))) for m in mirrors]

    def _seen_last(self, key: str) -> float:
        slot = self._slots.get(key)
        return slot.last_used if slot is not None else 0.0

    def _scan_on_disk(self) -> list[MirrorOnDisk]:
        found = []
        for path in self.repos_dir.glob("*/*/*.git"):
            key = f"{path.parent.parent.name}/{path.parent.name}/{path.name.removesuffix('.git')}"
            found.append(MirrorOnDisk(key, path, _tree_size(path), _last_used_on_disk(path)))
        return found

    async def evict_to_fit(self, max_size: int) -> tuple[int, int]:
        """Remove least recently used mirrors until the rest fit in `max_size`, passing by any that is being read
        or changed. Returns (bytes left, mirrors evicted)."""
        mirrors = await self.scan()
        total = sum(mirror.size for mirror in mirrors)
        evicted = 0
        for mirror in sorted(mirrors, key=lambda m: m.last_used):
            if total <= max_size:
                break
            slot = self.slot(mirror.key)
            if slot.readers or slot.lock.locked() or slot.evicting:
                continue
            # Set before the first await: from here no new reader starts, and the lock keeps fills out.
            slot.evicting = True
            try:
                async with slot.lock:
                    await self.move_aside(slot)
            finally:
                slot.evicting = False
            log.info("mirror of %s evicted (%d bytes) to stay under maxSize", mirror.key, mirror.size)
            total -= mirror.size
            evicted += 1
        return total, evicted


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # moved aside meanwhile, or a full disk: the order of eviction can live with it
        path.touch()


def _tree_size(path: Path) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a pack replaced by gc while we walk
                total += (Path(directory) / name).lstat().st_size
    return total


def _last_used_on_disk(path: Path) -> float:
    for candidate in (path / LAST_USED_MARK, path):
        with contextlib.suppress(OSError):
            return candidate.stat().st_mtime
    return 0.0


def _clear_stale_locks(mirror: Path, older_than: float) -> list[str]:
    removed = []
    for lock in [*(mirror / name for name in _TOP_LEVEL_LOCKS), *_ref_locks(mirror)]:
        with contextlib.suppress(OSError):
            if lock.stat().st_mtime < older_than:
                lock.unlink()
                removed.append(str(lock.relative_to(mirror)))
    return removed


def _ref_locks(mirror: Path) -> Iterator[Path]:
    for directory, _, files in os.walk(mirror / "refs"):
        for name in files:
            if name.endswith(".lock"):
                yield Path(directory) / name
