"""GitHub App credentials: repo → installation → installation token, cached per installation and shared by its repos."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import GitHubAppEntry
from ..errors import AppNotInstalled, CredentialError, GitHubRefused, InstallationGone
from ..metrics import Metrics
from ..routing import RepoRef
from . import Credential
from .cache import BoundedStore, CachedToken, SingleFlight, TokenCache
from .github_api import GitHubAppApi

log = logging.getLogger("git_token_proxy.github_app")

INSTALLATION_TTL = 3600.0  # repo → installation id rarely changes; a 404 on mint corrects it sooner
NOT_INSTALLED_TTL = 300.0  # a definite "not installed" is remembered briefly, so a typo does not hammer the API
_NOT_INSTALLED = -1


class GitHubAppSource:
    """The credential source of one GITHUB_APP_INSTALLATION entry."""

    def __init__(
        self, entry: GitHubAppEntry, api: GitHubAppApi, tokens: TokenCache, max_entries: int, metrics: Metrics
    ) -> None:
        self.entry_id = entry.id
        self.entry = entry
        self.identity: object = (entry, api.api_url, api.timeout, max_entries, api.key_fingerprint)
        self._metrics = metrics
        self._api = api
        self._tokens = tokens
        self._installations = BoundedStore(max_entries, f"installations:{entry.id}")
        self._lookups: SingleFlight[int] = SingleFlight()
        self._permissions = entry.token_permissions
        # The scope is part of the cache key: a read-only token must never serve a request that wanted more.
        scope = ",".join(f"{name}:{level}" for name, level in sorted((self._permissions or {}).items()))
        self._key_prefix = f"{api.api_url}|{api.issuer}|{entry.username}|{scope}|"

    async def get_credential(self, repo: RepoRef) -> Credential:
        try:
            return await self._credential_for(repo)
        except InstallationGone as gone:
            if self.entry.installation_id is not None:
                raise GitHubRefused(
                    f"installation {gone.installation_id} configured for {self.entry_id!r} does not exist"
                ) from None
            # The app was reinstalled: its old id is gone. Forget it (unless a concurrent request already
            # replaced it) and look it up again, once.
            key = self._repo_key(repo)
            if await self._installations.get(key) == gone.installation_id:
                await self._installations.delete(key)
            return await self._credential_for(repo)

    async def invalidate(self, credential: Credential, repo: RepoRef) -> bool:
        """Upstream answered 401 to this token (revoked, or expired early): drop it so the retry mints anew."""
        installation_id = await self._installations.get(self._repo_key(repo)) or self.entry.installation_id
        if installation_id is None or installation_id == _NOT_INSTALLED:
            return False
        if await self._tokens.evict(self.token_key(installation_id, repo), credential):
            # Counted once per rejected token, however many requests saw it fail.
            log.warning("entry %r: upstream rejected a cached token; minting a new one", self.entry_id)
            self._metrics.heals.labels(self.entry_id).inc()
        return True  # evicted now or by a concurrent request: either way, asking again gives a fresh token

    async def close(self) -> None:
        return None

    # ------------------------------------------------------------ installation ids

    async def installation_for(self, repo: RepoRef) -> int:
        if self.entry.installation_id is not None:
            return self.entry.installation_id
        key = self._repo_key(repo)
        known = await self._installations.get(key)
        if known is None:
            known = await self._lookups.run(key, lambda: self._look_up(repo, key))
        if known == _NOT_INSTALLED:
            raise AppNotInstalled(
                f"GitHub App {self.entry_id!r} is not installed on {repo.full_name} (or cannot see it)"
            )
        return int(known)

    async def _look_up(self, repo: RepoRef, key: str) -> int:
        try:
            installation_id = await self._api.find_installation(repo.owner, repo.name)
        except AppNotInstalled as error:
            self._metrics.mint_failed(self.entry_id, error)
            await self._installations.set(key, _NOT_INSTALLED, NOT_INSTALLED_TTL)
            raise
        except CredentialError as error:
            self._metrics.mint_failed(self.entry_id, error)
            raise
        # Only answers are cached; a 5xx or a timeout raised above and left nothing behind.
        await self._installations.set(key, installation_id, INSTALLATION_TTL)
        return installation_id

    def _repo_key(self, repo: RepoRef) -> str:
        return f"{repo.owner}/{repo.name}".lower()

    # ------------------------------------------------------------ tokens

    def token_key(self, installation_id: int, repo: RepoRef) -> str:
        """One token per (API, app, username, scope, installation): every repo of the installation shares it,
        unless scopeToRepository asks for one token per repo."""
        repo_part = self._repo_key(repo) if self.entry.scope_to_repository else ""
        return f"{self._key_prefix}{installation_id}|{repo_part}"

    async def _credential_for(self, repo: RepoRef) -> Credential:
        installation_id = await self.installation_for(repo)
        key = self.token_key(installation_id, repo)
        return await self._tokens.get(key, lambda: self._mint(installation_id, repo))

    def _scope(self, repo: RepoRef) -> dict[str, object] | None:
        scope: dict[str, object] = {}
        if self._permissions:
            scope["permissions"] = self._permissions
        if self.entry.scope_to_repository:
            scope["repositories"] = [repo.name]
        return scope or None

    async def _mint(self, installation_id: int, repo: RepoRef) -> CachedToken:
        started = time.monotonic()
        try:
            minted = await self._api.create_installation_token(installation_id, self._scope(repo))
        except InstallationGone:
            raise  # not a failure: get_credential looks the installation up again
        except CredentialError as error:
            self._metrics.mint_failed(self.entry_id, error)
            raise
        self._metrics.mints.labels(self.entry_id).inc()
        self._metrics.mint_latency.labels(self.entry_id).observe(time.monotonic() - started)
        expires, refresh_at = self._tokens.deadlines(minted.lifetime)
        credential = Credential(self.entry.username, minted.token, "minted")
        log.info(
            "entry %r: minted a token for installation %d in %.0f ms; expires %s, refresh in %.0f s",
            self.entry_id, installation_id, (time.monotonic() - started) * 1000,
            minted.expires_at.isoformat(), refresh_at - time.monotonic(),
        )  # fmt: skip
        return CachedToken(
            minted=credential,
            reused=Credential(self.entry.username, minted.token, "cached"),
            expires_at_wall=minted.expires_at.isoformat(),
            expires=expires,
            refresh_at=refresh_at,
            permissions=minted.permissions,
        )

    async def describe_app(self) -> dict[str, Any]:
        """GET /app with this entry's JWT: proves the key and issuer are right (used by `check`)."""
        return await self._api.get_app()

    async def peek_token(self, repo: RepoRef) -> CachedToken | None:
        return await self._tokens.peek(self.token_key(await self.installation_for(repo), repo))
