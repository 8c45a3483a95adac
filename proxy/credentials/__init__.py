"""Credentials: where a token comes from. Every source implements `CredentialSource`; `forward` knows no other."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..routing import RepoRef

Origin = Literal["static", "cached", "minted"]


@dataclass(frozen=True, repr=False)
class Credential:
    """A username and token for one upstream request. `repr` never shows the token."""

    username: str
    token: str
    origin: Origin
    # Computed once per token, not per request: the hot path only copies strings.
    authorization: str = field(init=False, compare=False)
    fingerprint: str = field(init=False, compare=False)  # 8 hex digits of SHA-256(token): to correlate, not to use

    def __post_init__(self) -> None:
        basic = base64.b64encode(f"{self.username}:{self.token}".encode()).decode("ascii")
        object.__setattr__(self, "authorization", f"Basic {basic}")
        object.__setattr__(self, "fingerprint", hashlib.sha256(self.token.encode()).hexdigest()[:8])

    def __repr__(self) -> str:
        return f"Credential(username={self.username!r}, token=<redacted>, origin={self.origin!r})"


@dataclass(frozen=True)
class CachedToken:
    """A token with its deadlines on the monotonic clock, and its two Credential forms built once."""

    minted: Credential  # origin "minted": what the request that paid for the mint gets
    reused: Credential  # origin "cached": what every later request gets
    expires_at_wall: str  # GitHub's expires_at, for logs and `check`
    expires: float  # monotonic deadline: GitHub's expires_at, judged on GitHub's own clock
    refresh_at: float  # monotonic: when to replace it (refreshBefore ahead of expiry, or at the max age)
    permissions: dict[str, str] = field(default_factory=dict)


class CredentialSource(Protocol):
    """One per auth entry. `get_credential` must be a dictionary hit when warm: it runs on every request."""

    entry_id: str

    @property
    def identity(self) -> object:
        """Everything the source was built from (entry, API URL, settings, key fingerprint): a reload keeps a
        source, caches and all, only when this is unchanged."""
        ...

    async def get_credential(self, repo: RepoRef) -> Credential: ...

    async def invalidate(self, credential: Credential, repo: RepoRef) -> bool:
        """Upstream rejected `credential` (401): drop it. True when asking again may give a different one. Raises
        HealSuspended while renewing is paused because fresh tokens were rejected too."""
        ...

    async def recheck_after_not_found(self, credential: Credential, repo: RepoRef) -> bool:
        """Upstream answered 404 with `credential`, which is how GitHub answers a dead token on a private repo.
        True when the credential turned out dead and was dropped: one retry with a fresh one is worth it."""
        ...

    async def why_push_refused(self, credential: Credential, repo: RepoRef) -> str | None:
        """Upstream refused a push (403) with `credential`: the reason, when the source knows the token cannot
        push (the permissions it was minted with), or None (a static token; a token that may write, refused for
        another reason). Never asks GitHub: it only explains a refusal."""
        ...

    def forget_failures(self) -> None:
        """A reload (SIGHUP, --watch): forget every remembered failure (rate limits, negative answers, backoffs),
        so that the next request asks again. Tokens and positive answers stay."""
        ...

    async def close(self) -> None: ...
