"""Authorization proof: a pack leaves the mirror only while a recent upstream answer shows the credential may read.

The pack request is a separate HTTP request from info/refs, so a client could skip the refs and ask for a pack
directly. The mirror holds objects for anyone, so what decides is upstream's word for this (entry, repo): a
success less than `ttl` ago, and no refusal since. One refusal voids the proof at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..bounded import BoundedDict

REFUSALS = frozenset({401, 403, 404})


class AuthProof:
    def __init__(self, ttl: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._proven: BoundedDict[tuple[str, str], float] = BoundedDict(max_entries)
        self._clock = clock

    def note(self, entry_id: str | None, repo: str, status: int) -> None:
        """Upstream answered `status` to a read of `repo` with this entry's credential."""
        key = (entry_id or "", repo.lower())
        if 200 <= status < 300:
            self._proven[key] = self._clock()
        elif status in REFUSALS:
            self._proven.pop(key, None)

    def holds(self, entry_id: str | None, repo: str) -> bool:
        proven_at = self._proven.get((entry_id or "", repo.lower()))
        return proven_at is not None and self._clock() - proven_at < self.ttl
