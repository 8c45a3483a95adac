"""LFS handles: the proxy's own unguessable names for storage actions, bound to one client and expiring."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ProxyError
from ..routing import Route

# However long the storage's signature lasts, a handle lasts at most this long: a leaked handle is worth an hour.
MAX_TTL = 3600.0
# Each handle is a few hundred bytes; a client asking for millions of objects evicts the oldest, not the process.
MAX_HANDLES = 200_000


class HandleRefused(ProxyError):
    """An /_lfs/ handle that is unknown, expired, or was given to another client."""


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
    """Lives as long as the process (a reload keeps it). Bounded: the oldest handles go first."""

    def __init__(self, limit: int = MAX_HANDLES, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._actions: OrderedDict[str, StorageAction] = OrderedDict()

    def __len__(self) -> int:
        return len(self._actions)

    def issue(self, action: StorageAction) -> str:
        now = self._clock()
        # Insertion order is nearly expiry order (every TTL is capped alike): the front holds the expired ones.
        while self._actions and (len(self._actions) >= self._limit or self._oldest().expires <= now):
            self._actions.popitem(last=False)
        handle = secrets.token_urlsafe(32)
        self._actions[handle] = action
        return handle

    def _oldest(self) -> StorageAction:
        return next(iter(self._actions.values()))

    def find(self, handle: str, client: str | None) -> StorageAction:
        action = self._actions.get(handle)
        if action is None:
            raise HandleRefused("unknown LFS object handle: ask for the object again (git lfs fetch)")
        if action.expires <= self._clock():
            del self._actions[handle]
            raise HandleRefused("this LFS object handle has expired: ask for the object again (git lfs fetch)")
        if action.client != client:
            raise HandleRefused("this LFS object handle was given to another client")
        return action
