"""The mirror cache: answers pack requests from a local bare mirror per repo, brought in line with upstream's refs
first. Refs and the right to read still come from upstream (see `forward` and `proof`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import MirrorConfig
from ..credentials import Credential
from ..metrics import Metrics
from ..routing import LinearPattern, compile_repo_pattern
from .fill import MirrorFiller
from .gitrun import MirrorGit
from .maintenance import MirrorMaintenance
from .objectstore import ObjectStore
from .pktline import NotAPackRequest, PackRequest, is_pack_request, parse_pack_request
from .serve import UploadPack, start_upload_pack
from .snapshots import FleetLeases, Snapshots
from .store import MirrorSlot, MirrorStore

log = logging.getLogger("git_token_proxy.mirror")

__all__ = ["Mirror", "MirrorAnswer", "is_pack_request"]


@dataclass
class MirrorAnswer:
    """A pack request answered from the mirror. `chunks` is upload-pack's output; call `close` when done, always."""

    outcome: Literal["hit", "filled"]  # served from what the mirror had, or after fetching into it
    chunks: AsyncIterator[bytes]
    _close: Callable[[], Awaitable[None]] = field(repr=False)

    async def close(self) -> None:
        """Ends upload-pack (killed and reaped if the client went away early); safe to call more than once."""
        await self._close()


class Mirror:
    """One per process. No disk is touched until the first request or maintenance pass."""

    def __init__(
        self, settings: MirrorConfig, ca_file: Path | None, metrics: Metrics, leases: FleetLeases | None = None
    ) -> None:
        self._patterns: list[LinearPattern] = [compile_repo_pattern("mirror.repos", p) for p in settings.repos]
        self._store = MirrorStore(settings.dir)
        self._git = MirrorGit(self._store.home, ca_file)
        self._maintenance = MirrorMaintenance(self._store, self._git, metrics, settings.max_size)
        self.snapshots = _build_snapshots(settings, ca_file, self._git, self._store, metrics, leases)
        self._filler = MirrorFiller(
            self._store, self._git, metrics, self._filled, self._maintenance.note_unclean, self.snapshots
        )
        self._serving: dict[UploadPack, MirrorSlot] = {}

    def covers(self, matched: str) -> bool:
        """`matched`: host, baseUrl path and owner/repo, as routing matched them (`Route.matched`)."""
        if MirrorStore.key_of(matched) is None:
            return False
        return not self._patterns or any(pattern.fullmatch(matched) for pattern in self._patterns)

    async def answer_pack(
        self, matched: str, body: bytes, git_protocol: str | None, upstream_repo_url: str,
        credential: Credential | None,
    ) -> MirrorAnswer | None:  # fmt: skip
        """The answer to a pack request (`body` already inflated), or None: send it upstream instead. None for
        anything but a fetch (ls-refs), wants the mirror cannot get, a broken mirror, a full disk."""
        arrived = time.monotonic()
        key = MirrorStore.key_of(matched)
        if key is None or not self.covers(matched) or not upstream_repo_url.startswith(("https://", "http://")):
            return None
        try:
            request = await asyncio.to_thread(parse_pack_request, body)  # bounded, but pure Python: off the loop
        except NotAPackRequest as why:
            log.debug("mirror of %s passes a request upstream: %s", key, why)
            return None
        slot = self._store.slot(key)
        try:
            await self._store.prepare()
            await self._filler.wait_for_check(slot)
        except OSError as error:
            log.warning("mirror directory unusable, requests go upstream: %s", error)
            return None
        if not self._store.start_reading(slot):
            return None  # being evicted this very moment
        answer = None
        try:
            answer = await self._answer(slot, request, body, git_protocol, upstream_repo_url, credential, arrived)
        except Exception:
            # A cache must never fail a clone: whatever went wrong here, upstream can still answer.
            log.exception("mirror of %s failed to answer; the request goes upstream", key)
        finally:
            if answer is None:
                self._store.stop_reading(slot)
        return answer

    async def _answer(
        self, slot: MirrorSlot, request: PackRequest, body: bytes, git_protocol: str | None, url: str,
        credential: Credential | None, arrived: float,
    ) -> MirrorAnswer | None:  # fmt: skip
        # Upstream's refs of now, every time: a commit upstream no longer has (force-pushed away, its reflog
        # expired, gc'd) must not outlive it here. The mirror serves only what those refs reach; anything else
        # goes upstream, whose answer is the truth (`not our ref`, or the object).
        had_them = not request.want_refs and not await self._git.missing_objects(slot.path, request.wants)
        if not had_them and self._filler.came_up_short_lately(slot):
            return None
        if not await self._filler.sync(slot, url, credential, arrived):
            return None
        if not had_them and await self._git.missing_objects(slot.path, request.wants):
            self._filler.note_short(slot)
            return None  # upstream's refs do not reach them: upstream answers
        # In a clean mirror (CLEAN_MARK) every object is one the refs reach; otherwise each want is checked, and
        # the mirror is pruned in the background. The client's `shallow` commits are checked either way: with a
        # deepen, upload-pack sends their parents ("unshallow"), so a shallow id that no ref reaches would bring
        # what a purged commit held, whatever the wants.
        checked = list(request.shallow)
        if not await self._store.is_clean(slot):
            self._maintenance.note_unclean(slot)
            checked += request.wants
        if checked and not await self._git.all_reachable(slot.path, checked):
            return None
        outcome: Literal["hit", "filled"] = "hit" if had_them else "filled"
        run = await start_upload_pack(
            self._git, slot.path, body, git_protocol, lambda failed: self._upload_pack_ended(slot, failed)
        )
        try:
            if not await run.read_head():
                await run.close()
                return None
            await self._store.mark_used(slot)
        except BaseException:
            await run.close()
            raise
        self._serving[run] = slot
        return MirrorAnswer(outcome, run, lambda: self._finish(run))

    async def _finish(self, run: UploadPack) -> None:
        slot = self._serving.pop(run, None)
        try:
            await run.close()
        finally:
            if slot is not None:  # the first close only; eviction may take the mirror once nobody reads it
                self._store.stop_reading(slot)

    def _upload_pack_ended(self, slot: MirrorSlot, failed: bool) -> None:
        if failed:  # a broken pack or ref shows here first: fsck decides, and a broken mirror is moved aside
            self._filler.schedule_check(slot)

    def _filled(self, slot: MirrorSlot) -> None:
        self._maintenance.note_filled(slot)
        if self.snapshots is not None:
            self.snapshots.note_filled(slot)  # publishes in the background, at most every publishEvery

    async def maintain_once(self) -> None:
        """One maintenance pass (what `run_maintenance` does periodically): git maintenance, eviction, the gauge."""
        await self._maintenance.run_once()

    async def run_maintenance(self) -> None:
        if self.snapshots is not None:
            await self.snapshots.prepare()  # the S3 client is ready before the first restore needs it
        await self._maintenance.run_forever()

    async def close(self) -> None:
        for run in list(self._serving):
            await self._finish(run)
        await self._filler.close()
        if self.snapshots is not None:
            await self.snapshots.close()


def _build_snapshots(
    settings: MirrorConfig, ca_file: Path | None, git: MirrorGit, store: MirrorStore, metrics: Metrics,
    leases: FleetLeases | None,
) -> Snapshots | None:  # fmt: skip
    if settings.snapshots is None:
        return None
    snapshots = settings.snapshots
    bucket = ObjectStore(snapshots.bucket, endpoint=snapshots.endpoint, region=snapshots.region, ca_file=ca_file)
    return Snapshots(snapshots, bucket, git, store, metrics, settings.max_size, leases)
