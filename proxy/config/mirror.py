"""Mirror: the local bare mirror per repo that answers repeat clones."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from .base import Model
from .units import PositiveDuration, PositiveSize


class MirrorConfig(Model):
    """Repeat clones come from a local bare mirror per repo; refs and authorization still come from upstream."""

    dir: Path  # one bare mirror per upstream repo under it, laid out by host/owner/repo
    max_size: PositiveSize = 10 * (1 << 30)  # LRU eviction of whole repos
    repos: list[str] = Field(
        default_factory=list
    )  # regexes like access.clients' repos, matched against host/owner/repo; empty: every repo
    # A pack is served from the mirror only while an upstream answer less than this old proves that the credential
    # can read the repo (and no refusal came since); otherwise upstream is asked first.
    auth_ttl: PositiveDuration = 60.0
    # Pack requests are read whole so that the mirror can answer them; all of them together hold at most this much.
    # One that does not fit (or is over 16 MiB, or slow) goes upstream as it comes, as it would without a mirror.
    max_held_bodies: PositiveSize = 64 * (1 << 20)
