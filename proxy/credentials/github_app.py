"""GitHub App credentials: owner → installation → installation token, cached per installation and shared by its repos.

Installations are looked up per owner (`/orgs/{owner}/installation`, then `/users/{owner}/installation`), not per
repo: every repo of an owner has the same answer, so 300 repo names cost one look-up. A repo outside the
installation's selection then gets GitHub's own 404 on the git endpoint, with a token that is already cached.
`/repos/{owner}/{repo}/installation` is kept for `check --repo` only, where telling "installed, but this repo is not
selected" apart is worth one call per run (GitHubAppApi.find_repo_installation).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import time
from typing import Any, Final

from ..bounded import BoundedDict
from ..config import GitHubAppEntry
from ..errors import (
    AppNotInstalled,
    CredentialError,
    GitHubRefused,
    HealSuspended,
    InstallationGone,
    MalformedAnswer,
    RateLimited,
)
from ..metrics import Metrics
from ..routing import RepoRef
from ..single_flight import SingleFlight
from . import CachedToken, Credential
from .backoff import CallBudget, HealBackoff, Pauses
from .cache import TokenCache
from .github_api import GitHubAppApi
from .shared import StoreFactory, local_stores

log = logging.getLogger("git_token_proxy.github_app")

INSTALLATION_TTL = 3600.0  # owner → installation id rarely changes; a 404 on mint corrects it sooner
NOT_INSTALLED_TTL = 300.0  # a definite "not installed" is remembered briefly, so a typo does not hammer the API
LOOKUPS_PER_OWNER_PER_MINUTE = 10  # failures are never cached; this bounds what they can cost
# GitHub's tokens live an hour, so a healthy installation needs about one mint an hour. Tokens that GitHub says
# live only seconds would otherwise be re-minted on nearly every request: this bounds the storm.
MINTS_PER_TOKEN_PER_MINUTE = 3
# A mint answer that cannot be used means a token was made and lost: the next mint waits, doubling up to 5 min.
MALFORMED_MINT_PAUSE, MAX_MALFORMED_MINT_PAUSE = 5.0, 300.0
LIVENESS_PERIOD = 60.0  # one liveness check per token per minute, whatever the number of 404s


NOT_GRANTED = "permissions requested are not granted"  # GitHub's words when a mint asks for too much


def _permission_text(permissions: dict[str, str]) -> str:
    return ", ".join(f"{name}:{level}" for name, level in sorted(permissions.items())) or "no permissions"


class _NotInstalled(enum.Enum):
    """The cached answer "the app has no installation on this owner": a type of its own, never an id."""

    MARKER = "not installed"


NOT_INSTALLED: Final = _NotInstalled.MARKER


class GitHubAppSource:
    """The credential source of one GITHUB_APP_INSTALLATION entry."""

    def __init__(
        self, entry: GitHubAppEntry, api: GitHubAppApi, tokens: TokenCache, max_entries: int, metrics: Metrics,
        stores: StoreFactory = local_stores,
    ) -> None:  # fmt: skip
        self.entry_id = entry.id
        self.entry = entry
        self.identity: object = (entry, api.api_url, api.timeout, max_entries, api.key_fingerprint)
        self._metrics = metrics
        self._api = api
        self._tokens = tokens
        self._max_entries = max_entries
        # Owners are client-driven: every table keyed by them (or by tokens, or by repos) is bounded.
        # `stores` may tier them with the fleet's shared cache; the namespace names the app, not just the entry.
        app = f"{api.api_url}|{api.issuer}"
        self._installations = stores(max_entries, f"installations:{app}")
        self._not_installed = stores(max_entries, f"not-installed:{app}")  # True while "not installed" holds
        self._lookups: SingleFlight[int | _NotInstalled] = SingleFlight()
        self._lookup_budget = CallBudget(max_entries, LOOKUPS_PER_OWNER_PER_MINUTE)
        self._mint_budget = CallBudget(max_entries, MINTS_PER_TOKEN_PER_MINUTE)
        self._mint_pauses = Pauses(max_entries, MALFORMED_MINT_PAUSE, MAX_MALFORMED_MINT_PAUSE)
        self._heals = HealBackoff(max_entries)
        self._checked: BoundedDict[str, float] = BoundedDict(max_entries)  # token digest → last liveness check
        self._checks: SingleFlight[bool] = SingleFlight()
        self._permissions = entry.token_permissions
        self._app_slug: str | None = None  # from GET /app, to name the app in refusals; asked at most once
        self._app_slug_asked = False
        # The scope is part of the cache key: a read-only token must never serve a request that wanted more. So is
        # the key's fingerprint: a rotated key mints anew, even with installationId set and the cache shared.
        scope = ",".join(f"{name}:{level}" for name, level in sorted((self._permissions or {}).items()))
        self._key_prefix = f"{api.api_url}|{api.issuer}|{api.key_fingerprint}|{entry.username}|{scope}|"

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
            owner = self._owner_key(repo)
            if await self._installations.get(owner) == gone.installation_id:
                await self._installations.delete(owner)
            return await self._credential_for(repo)

    async def invalidate(self, credential: Credential, repo: RepoRef) -> bool:
        """Upstream answered 401 to this token (revoked, or expired early): drop it so the retry mints anew,
        unless heals are suspended for its installation (then HealSuspended says for how long)."""
        key = await self._token_key_if_known(repo)
        if key is None:
            return False
        suspended = self._heals.suspended_for(key, credential)
        if suspended:
            raise HealSuspended(
                f"upstream rejected a freshly minted token of {self.entry_id!r} too; no new token for {suspended:.0f} s"
            )
        await self._heal(key, credential, "upstream rejected a cached token")
        return True  # evicted now or by a concurrent request: either way, asking again gives a fresh token

    async def recheck_after_not_found(self, credential: Credential, repo: RepoRef) -> bool:
        """GitHub answers a dead token on a private repo with 404, not 401. So after a 404 to a cached token, ask
        GitHub whether the token is alive (at most once per token per minute, shared by all requests). True when
        the token was dead and is evicted: a retry with a fresh one is worth it."""
        if credential.origin != "cached":
            return False  # a token minted for this very request is alive: the 404 is GitHub's answer
        key = await self._token_key_if_known(repo)
        if key is None:
            return False
        cached = await self._tokens.peek(key)
        if cached is None or cached.reused.token != credential.token:
            return True  # replaced since this request took it: one retry with the current token, no API call
        digest = hashlib.sha256(credential.token.encode()).hexdigest()
        last = self._checked.get(digest)
        if last is not None and time.monotonic() - last < LIVENESS_PERIOD:
            return False
        return await self._checks.run(digest, lambda: self._check_liveness(key, digest, credential))

    def forget_failures(self) -> None:
        """A reload: whatever went wrong is asked about again at once. Rate-limit windows, "not installed"
        answers, look-up budgets, paused mints and liveness results are forgotten."""
        self._api.forget_failures()
        self._app_slug_asked = self._app_slug is not None
        self._not_installed.clear()
        # Not the heal backoff: a reload does not make a rejecting upstream accept tokens, and a file rewritten
        # often (or SIGHUP in a loop) must not bring the heal storm back.
        for table in (self._lookup_budget, self._mint_pauses, self._checked):
            table.clear()

    async def close(self) -> None:
        return None

    async def why_push_refused(self, credential: Credential, repo: RepoRef) -> str | None:
        key = await self._token_key_if_known(repo)
        cached = await self._tokens.peek(key) if key is not None else None
        if cached is None or cached.reused.token != credential.token:
            return None
        level = cached.permissions.get("contents")
        if level == "write":
            return None  # it may push: branch protection or a ruleset refused it, and GitHub's words say which
        has = f"contents: {level}" if level else "no contents permission"
        token = f"the token of auth entry {self.entry_id!r} for {repo.full_name} has {has}"
        token += "; pushing needs contents: write"
        asked = (self._permissions or {}).get("contents")
        if asked is not None and asked != "write":
            return f"{token}. The entry asks for contents: {asked} (its permissions): ask for write, or push elsewhere"
        return (
            f"{token}. Grant it in the GitHub App's settings (Permissions, Contents: Read and write) and accept it "
            "on the installation"
        )

    async def held_tokens(self) -> list[str]:
        """The live tokens of this source's cache keys (another entry of the same app and scope shares them)."""
        return [token.reused.token for token in await self._tokens.held(self._key_prefix)]

    async def revoke_token(self, token: str, budget: float) -> bool:
        return await self._api.revoke_token(token, budget)

    # ------------------------------------------------------------ healing

    async def _heal(self, key: str, credential: Credential, why: str) -> bool:
        evicted = await self._tokens.evict(key, credential)
        if evicted:
            # Counted once per rejected token, however many requests saw it fail.
            log.warning("entry %r: %s; minting a new one", self.entry_id, why)
            self._metrics.heals.labels(self.entry_id).inc()
            self._heals.healed(key, credential)
        return evicted

    async def _check_liveness(self, key: str, digest: str, credential: Credential) -> bool:
        self._checked[digest] = time.monotonic()  # before asking: a failed check also waits its minute
        try:
            alive = await self._api.token_is_alive(credential.token)
        except CredentialError as error:
            log.info("entry %r: could not check a token after a 404 (%s)", self.entry_id, error)
            self._metrics.liveness_checks.labels(self.entry_id, "error").inc()
            return False
        self._metrics.liveness_checks.labels(self.entry_id, "alive" if alive else "dead").inc()
        if alive or self._heals.suspended_for(key, credential):
            return False
        await self._heal(key, credential, "GitHub says a cached token is dead (it answered 404 with it)")
        return True

    # ------------------------------------------------------------ installation ids

    async def installation_for(self, repo: RepoRef) -> int:
        if self.entry.installation_id is not None:
            return self.entry.installation_id
        owner = self._owner_key(repo)
        known = await self._known(owner)
        if known is None:
            known = await self._lookups.run(owner, lambda: self._look_up(owner))
        if known is NOT_INSTALLED:
            raise AppNotInstalled(
                f"GitHub App {self.entry_id!r} is not installed on {repo.full_name} (or cannot see it)"
                f"{await self._app_named()}; this answer is remembered for up to {NOT_INSTALLED_TTL:.0f} s: install "
                f"the app on {repo.owner} (or add the repo to its selection), then reload the proxy (SIGHUP) to "
                "retry at once"
            )
        assert isinstance(known, int)
        return known

    async def _app_named(self) -> str:
        """` (app 'acme-ci')`: the entry id is the operator's name, the slug is the one GitHub's pages show. One
        GET /app the first time a refusal needs it (the JWT works, or the look-up would have failed), then none."""
        if not self._app_slug_asked:
            self._app_slug_asked = True
            with contextlib.suppress(CredentialError):  # only a nicer message was at stake
                app = await self._api.get_app()
                self._app_slug = app["slug"] or app["name"]  # `slug` is optional in GitHub's description
        return f" (app {self._app_slug!r})" if self._app_slug else ""

    async def _known(self, owner: str) -> int | _NotInstalled | None:
        if (installation_id := await self._installations.get(owner)) is not None:
            return int(installation_id)
        return NOT_INSTALLED if await self._not_installed.get(owner) else None

    async def _look_up(self, owner: str) -> int | _NotInstalled:
        # Reading the stores may await (a shared tier): a flight that ended meanwhile may have answered already.
        known = await self._known(owner)
        if known is not None:
            return known
        try:
            self._spend_lookup(owner)
            found = await self._api.find_owner_installation(owner)
        except CredentialError as error:
            self._metrics.mint_failed(self.entry_id, error)
            raise
        # Only answers are cached; a 5xx or a timeout raised above and left nothing behind.
        if found is None:  # counted by forward as a failure only if the request is refused (no public fallback)
            await self._not_installed.set(owner, True, NOT_INSTALLED_TTL)
            return NOT_INSTALLED
        await self._installations.set(owner, found, INSTALLATION_TTL)
        return found

    def _spend_lookup(self, owner: str) -> None:
        wait = self._lookup_budget.take(owner)
        if wait:
            raise RateLimited(
                f"too many installation look-ups of {self.entry_id!r} for {owner} "
                f"({LOOKUPS_PER_OWNER_PER_MINUTE} a minute); the next in {wait:.0f} s"
            )

    def _owner_key(self, repo: RepoRef) -> str:
        return repo.owner.lower()

    def _repo_key(self, repo: RepoRef) -> str:
        return f"{repo.owner}/{repo.name}".lower()

    # ------------------------------------------------------------ tokens

    def token_key(self, installation_id: int, repo: RepoRef) -> str:
        """One token per (API, app, key, username, scope, installation): every repo of the installation shares it,
        unless scopeToRepository asks for one token per repo."""
        repo_part = self._repo_key(repo) if self.entry.scope_to_repository else ""
        return f"{self._key_prefix}{installation_id}|{repo_part}"

    async def _token_key_if_known(self, repo: RepoRef) -> str | None:
        """The cache key of the token `repo` uses, without asking GitHub anything (None if it is not known)."""
        installation_id = self.entry.installation_id
        if installation_id is None:
            installation_id = await self._installations.get(self._owner_key(repo))
        return self.token_key(installation_id, repo) if isinstance(installation_id, int) else None

    async def _credential_for(self, repo: RepoRef) -> Credential:
        installation_id = await self.installation_for(repo)
        key = self.token_key(installation_id, repo)
        return await self._tokens.get(key, lambda: self._mint(installation_id, repo, key))

    def _scope(self, repo: RepoRef) -> dict[str, object] | None:
        scope: dict[str, object] = {}
        if self._permissions:
            scope["permissions"] = self._permissions
        if self.entry.scope_to_repository:
            scope["repositories"] = [repo.name]
        return scope or None

    async def _mint(self, installation_id: int, repo: RepoRef, key: str) -> CachedToken:
        started = time.monotonic()
        try:
            self._refuse_if_paused(key)
            minted = await self._api.create_installation_token(installation_id, self._scope(repo))
        except InstallationGone:
            raise  # not a failure: get_credential looks the installation up again
        except CredentialError as error:
            if isinstance(error, MalformedAnswer):
                self._mint_pauses.failed(key, str(error))
            self._metrics.mint_failed(self.entry_id, error)
            if isinstance(error, GitHubRefused) and NOT_GRANTED in str(error) and self._permissions:
                raise await self._explain_not_granted(error, repo) from None
            raise
        self._mint_pauses.succeeded(key)
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

    async def _explain_not_granted(self, error: GitHubRefused, repo: RepoRef) -> GitHubRefused:
        """GitHub says only "not granted": name what was asked and what the installation has, so that the fix
        (grant it in the app's settings and accept it on the installation, or ask for less) is plain. Bounded by
        the mint budget like the mint itself."""
        asked = _permission_text(self._permissions or {})  # never empty: only an entry that asks gets here
        granted = await self._api.installation_permissions(repo.owner)
        has = _permission_text(granted) if granted is not None else "permissions that could not be read"
        return GitHubRefused(
            f"{error} Asked for {asked}; the installation on {repo.owner}{await self._app_named()} has {has}: grant "
            "the permission in the app's settings (and accept it on the installation), or ask for less"
        )

    def _refuse_if_paused(self, key: str) -> None:
        paused = self._mint_pauses.current(key)
        if paused is not None:
            seconds, reason = paused
            raise GitHubRefused(f"{reason}; not minting again for {seconds:.0f} s")
        wait = self._mint_budget.take(key)
        if wait:
            raise RateLimited(
                f"{MINTS_PER_TOKEN_PER_MINUTE} tokens minted for {self.entry_id!r} within a minute (do GitHub's "
                f"tokens expire that soon?); the next in {wait:.0f} s"
            )

    async def describe_app(self) -> dict[str, Any]:
        """GET /app with this entry's JWT: proves the key and issuer are right (used by `check`)."""
        return await self._api.get_app()

    async def repo_installation(self, repo: RepoRef) -> int | None:
        """The installation that can see this very repo, or None: one API call, uncached, for `check --repo`."""
        return await self._api.find_repo_installation(repo.owner, repo.name)

    async def peek_token(self, repo: RepoRef) -> CachedToken | None:
        return await self._tokens.peek(self.token_key(await self.installation_for(repo), repo))
