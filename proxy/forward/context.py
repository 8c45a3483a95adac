"""Context: what a request needs from the running config (`ForwardContext`, swapped whole by a reload) and from
the process (`LiveContext`: the transfer watch, the body slots and the LFS handles, which outlive reloads)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..access import AccessControl
from ..bodies import HeldBytes
from ..credentials import CredentialSource
from ..lfs import HandleStore, LfsPolicy
from ..metrics import Metrics
from ..routing import Router
from .watch import BodySlots, TransferWatch

if TYPE_CHECKING:  # the mirror and push packages are loaded by app.build_*, for configs that use them only
    from ..mirror import Mirror
    from ..mirror.proof import AuthProof
    from ..push.budget import CompareBudget
    from ..push.rules import PushPolicy


@dataclass(frozen=True)
class PushSettings:
    """What checking a push needs beyond the request: the entries' policies (a client's ride on its Client), and
    GitHub's API for the fast-forward check (the API session, and each entry's API URL)."""

    entry_policies: Mapping[str, PushPolicy]
    api_session: aiohttp.ClientSession
    api_urls: Mapping[str, str]  # entry id -> its REST API
    compare_budget: CompareBudget  # how often each entry, and each party, may ask it


@dataclass(frozen=True)
class ForwardContext:
    """Everything a request needs, built once per config by `app`."""

    router: Router
    access: AccessControl
    sources: Mapping[str, CredentialSource]
    session: aiohttp.ClientSession
    metrics: Metrics
    allowed_hosts: frozenset[str] = frozenset()  # Host header values besides loopback names (lower case)
    body_timeout: float = 15.0  # for bodies the proxy reads whole in order to check them
    mirror: Mirror | None = None  # mirror.dir: pack requests may be answered from a local mirror
    proof: AuthProof | None = None  # with a mirror: upstream's recent word that a credential may read a repo
    lfs: LfsPolicy | None = None  # lfs.proxyObjects: LFS objects go through the proxy, under handles
    held_bodies: HeldBytes | None = None  # with a mirror: what all pack requests together may hold in memory
    push: PushSettings | None = None  # with a push policy anywhere in the config


MAX_HELD_PUSHES = 8 << 30  # several pushes at push.maxCheckedPackSize's default (1 GiB) each


@dataclass
class LiveContext:
    """A reload replaces `current` in one assignment; a request keeps the context it started with to its end."""

    current: ForwardContext
    transfers: TransferWatch
    body_slots: BodySlots | None = None
    lfs_handles: HandleStore = field(default_factory=HandleStore)  # outlive reloads, like the transfers they name
    # What all pushes being checked for a fast-forward hold at once (on disk, past their first MiB).
    held_pushes: HeldBytes = field(default_factory=lambda: HeldBytes(MAX_HELD_PUSHES))


FORWARD_CONTEXT = web.AppKey("forward_context", LiveContext)
