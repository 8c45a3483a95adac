"""LFS handles: the proxy's own unguessable names for storage actions, bound to one client and expiring."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HandleRefused
from ..routing import Route

# However long the storage's signature lasts, a handle lasts at most this long: a leaked handle is worth an hour.
MAX_TTL = 3600.0
# Each handle is a few hundred bytes; a client asking for millions of objects evicts the oldest, not the process.
MAX_HANDLES = 200_000
# git-lfs asks for 100 objects a batch and transfers them before it moves on: a client holding this many live
# handles is fetching hundreds of batches at once, or making objects up.
MAX_HANDLES_PER_CLIENT = 20_000


@dataclass(frozen=True, repr=False)
class StorageAction:
    """What a handle stands for. `href` carries the storage's signature and `headers` its credential: neither is
    ever logged or shown (see __repr__)."""

    action: str  # download, upload or verify
    method: str  # GET, PUT or POST
    href: str
    headers: tuple[tuple[str, str], ...]
    storage_host: str  # the lfs.storageHosts[].host the href named
    oid: str  # lower-case hex SHA-256
    size: int
    route: Route  # the batch request's: repo, entry, for access control and the audit line
    client: str | None  # the access client that made the batch request (None: access control is off)
    expires: float  # time.monotonic()

    def __repr__(self) -> str:
        return f"StorageAction({self.action} {self.oid[:12]}… {self.size} B on {self.storage_host})"


class HandleStore:
    """Lives as long as the process (a reload keeps it). Bounded twice, so that one client asking for made-up
    objects by the thousand cannot evict everyone else's live downloads: each client holds at most
    `per_client` handles (its own oldest go first), and when the whole store is full, the oldest handle of the
    client holding the most goes. Without access control every request is the same client: then the bound is
    the store's alone."""

    def __init__(
        self, limit: int = MAX_HANDLES, clock: Callable[[], float] = time.monotonic,
        per_client: int = MAX_HANDLES_PER_CLIENT,
    ) -> None:  # fmt: skip
        self._limit = limit
        self._per_client = per_client
        self._clock = clock
        self._actions: dict[str, StorageAction] = {}
        # Per client, its handles in the order issued: insertion order is nearly expiry order (every TTL is
        # capped alike), so the front holds the expired ones.
        self._by_client: dict[str | None, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._actions)

    def issue(self, action: StorageAction) -> str:
        self._drop_expired(action.client, self._clock())
        while len(self._by_client.get(action.client, ())) >= self._per_client:
            self._drop_oldest(action.client)
        while len(self._actions) >= self._limit:
            self._drop_oldest(max(self._by_client, key=lambda client: len(self._by_client[client])))
        handle = secrets.token_urlsafe(32)
        self._actions[handle] = action
        self._by_client.setdefault(action.client, OrderedDict())[handle] = None
        return handle

    def _drop_expired(self, client: str | None, now: float) -> None:
        while (owned := self._by_client.get(client)) and self._actions[next(iter(owned))].expires <= now:
            self._forget(next(iter(owned)))

    def _drop_oldest(self, client: str | None) -> None:
        self._forget(next(iter(self._by_client[client])))

    def _forget(self, handle: str) -> None:
        action = self._actions.pop(handle)
        owned = self._by_client[action.client]
        del owned[handle]
        if not owned:
            del self._by_client[action.client]

    def find(self, handle: str, client: str | None) -> StorageAction:
        action = self._actions.get(handle)
        if action is None:
            raise HandleRefused("unknown LFS object handle: ask for the object again (git lfs fetch)")
        if action.expires <= self._clock():
            self._forget(handle)
            raise HandleRefused("this LFS object handle has expired: ask for the object again (git lfs fetch)")
        if action.client != client:
            raise HandleRefused("this LFS object handle was given to another client")
        return action
