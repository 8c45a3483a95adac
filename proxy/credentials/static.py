"""Static credentials: an `OAUTH_TOKEN` entry's token, the same for every repo it matches."""

from __future__ import annotations

from ..config import OAuthTokenEntry
from ..routing import RepoRef
from . import Credential


class StaticTokenSource:
    def __init__(self, entry: OAuthTokenEntry) -> None:
        self.entry_id = entry.id
        self.identity: object = entry
        self._credential = Credential(entry.username, entry.token.get_secret_value(), "static")

    async def get_credential(self, repo: RepoRef) -> Credential:
        return self._credential

    async def invalidate(self, credential: Credential, repo: RepoRef) -> bool:
        return False  # a fixed token cannot be renewed; the 401 reaches the user as a readable error

    async def recheck_after_not_found(self, credential: Credential, repo: RepoRef) -> bool:
        return False  # nothing to renew: the 404 is passed on

    async def why_push_refused(self, credential: Credential, repo: RepoRef) -> str | None:
        return None  # a static token's scopes are GitHub's business: nothing is known here

    def forget_failures(self) -> None:
        return None  # a static token remembers no failure

    async def close(self) -> None:
        return None
