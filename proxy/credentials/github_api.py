"""GitHub's App API: a JWT signed on GitHub's clock, installation look-ups and token mints, retried where it helps."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import jwt

from .. import __version__
from ..errors import (
    AppNotInstalled,
    GitHubRefused,
    GitHubUnavailable,
    InstallationGone,
    JwtRejected,
    RateLimited,
)
from .keys import AppKey

log = logging.getLogger("git_token_proxy.github_api")

API_VERSION = "2022-11-28"
# GitHub rejects an `iat` in its future and an `exp` more than 10 minutes ahead. Backdating `iat` by a minute and
# keeping `exp` 9 minutes ahead leaves room for a clock that is off by up to a minute either way.
JWT_BACKDATE = 60
JWT_LIFETIME = 540
JWT_REUSE = 480  # re-sign after 8 minutes, well before the 9-minute `exp`
MAX_SKEW = 600  # never trust a Date header further off than 10 minutes
MAX_TRIES = 3
SHORT_RATE_LIMIT_WAIT = 10.0  # waits up to this long are sat out; longer ones fail fast with a 503
_SKEW_MESSAGES = ("'Issued at'", "'Expiration time'")


@dataclass(frozen=True)
class MintedToken:
    token: str = field(repr=False)
    expires_at: datetime
    lifetime: float  # seconds it had left when minted, measured on GitHub's clock (expires_at - Date)
    permissions: dict[str, str]
    repositories: list[str] | None


@dataclass(frozen=True)
class _Answer:
    status: int
    data: dict[str, Any]
    headers: Any  # CIMultiDictProxy: case-insensitive
    server_time: float | None  # GitHub's clock, from the Date header

    @property
    def message(self) -> str:
        return str(self.data.get("message") or f"HTTP {self.status}")


class GitHubAppApi:
    """One per app entry. Holds the app's key, the last JWT and the clock offset learned from GitHub."""

    def __init__(
        self, *, entry_id: str, api_url: str, issuer: str, key: AppKey, session: aiohttp.ClientSession,
        timeout: float,
    ) -> None:  # fmt: skip
        self.entry_id = entry_id
        self.api_url = api_url
        self.issuer = issuer
        self._key = key
        self._session = session
        self.timeout = timeout
        self._skew = 0.0  # GitHub's clock minus ours, learned when GitHub complains about iat/exp
        self._jwt: str | None = None
        self._jwt_signed_at = 0.0
        self._rate_limited_until = 0.0  # wall clock: until then, fail fast without asking GitHub again
        self.key_fingerprint = key.fingerprint

    # ------------------------------------------------------------ the three calls

    async def get_app(self) -> dict[str, Any]:
        answer = await self._call("GET", "/app")
        if answer.status != 200:
            raise GitHubRefused(f"GitHub refused GET /app for {self.entry_id!r}: {answer.message}")
        return answer.data

    async def find_installation(self, owner: str, repo: str) -> int:
        answer = await self._call("GET", f"/repos/{owner}/{repo}/installation")
        if answer.status == 404:
            raise AppNotInstalled(f"GitHub App {self.entry_id!r} is not installed on {owner}/{repo} (or cannot see it)")
        if answer.status != 200 or not isinstance(answer.data.get("id"), int):
            raise GitHubRefused(
                f"GitHub refused the installation look-up of {self.entry_id!r} for {owner}/{repo}: {answer.message}"
            )
        return int(answer.data["id"])

    async def create_installation_token(self, installation_id: int, scope: dict[str, Any] | None = None) -> MintedToken:
        answer = await self._call("POST", f"/app/installations/{installation_id}/access_tokens", body=scope)
        if answer.status == 404:
            raise InstallationGone(installation_id, f"installation {installation_id} of {self.entry_id!r} is gone")
        if answer.status != 201 or not isinstance(answer.data.get("token"), str):
            raise GitHubRefused(f"GitHub refused to mint a token for {self.entry_id!r}: {answer.message}")
        try:
            expires_at = datetime.fromisoformat(str(answer.data["expires_at"]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            raise GitHubRefused(f"GitHub's token for {self.entry_id!r} came without a valid expires_at") from None
        github_now = answer.server_time if answer.server_time is not None else time.time() + self._skew
        repositories = answer.data.get("repositories")
        return MintedToken(
            token=answer.data["token"],
            expires_at=expires_at,
            lifetime=expires_at.timestamp() - github_now,
            permissions=dict(answer.data.get("permissions") or {}),
            repositories=[r.get("full_name", r.get("name")) for r in repositories] if repositories else None,
        )

    # ------------------------------------------------------------ JWT

    def _signed_jwt(self) -> str:
        if self._jwt is None or time.monotonic() - self._jwt_signed_at > JWT_REUSE:
            now = int(time.time() + self._skew)
            claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self.issuer}
            self._jwt = jwt.encode(claims, self._key.key, algorithm="RS256")
            self._jwt_signed_at = time.monotonic()
        return self._jwt

    def _learn_skew(self, answer: _Answer) -> bool:
        """GitHub said our iat/exp are off: take its clock from `Date` and sign again. True if anything changed."""
        if answer.server_time is None or not any(text in answer.message for text in _SKEW_MESSAGES):
            return False
        offset = max(-MAX_SKEW, min(MAX_SKEW, answer.server_time - time.time()))
        if abs(offset - self._skew) < 1:
            return False
        log.warning(
            "entry %r: this clock is %+.0f s off GitHub's (%s); signing JWTs on GitHub's time",
            self.entry_id, -offset, self.api_url,
        )  # fmt: skip
        self._skew, self._jwt = offset, None
        return True

    # ------------------------------------------------------------ transport, retries

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> _Answer:
        self._fail_if_rate_limited()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        url, tries, skew_retried, redirected = f"{self.api_url}{path}", 0, False, False
        while True:
            tries += 1
            # Each try gets its share of what is left, so one hung connection cannot eat every retry's time.
            budget = (deadline - loop.time()) / max(1, MAX_TRIES - tries + 1)
            try:
                answer = await self._send_once(method, url, body, budget)
            except (TimeoutError, aiohttp.ClientError) as error:
                if tries < MAX_TRIES and await _backoff(tries, deadline):
                    continue
                raise GitHubUnavailable(
                    f"GitHub API at {self.api_url} unreachable for {self.entry_id!r}: {_describe(error)}"
                ) from None
            if answer.status >= 500:
                if tries < MAX_TRIES and await _backoff(tries, deadline):
                    continue
                raise GitHubUnavailable(
                    f"GitHub API failed for {self.entry_id!r}: HTTP {answer.status} after {tries} tries"
                )
            if answer.status == 401:
                if not skew_retried and self._learn_skew(answer):
                    skew_retried = True
                    continue
                raise JwtRejected(f"GitHub rejected the JWT for {self.entry_id!r}: {answer.message}")
            wait = _rate_limit_wait(answer)
            if wait is not None:
                wait = max(wait, 1.0)  # a reset "now" (clocks differ) must not become a busy loop
                if wait <= SHORT_RATE_LIMIT_WAIT and tries < MAX_TRIES and loop.time() + wait < deadline:
                    log.info("entry %r: GitHub rate limit, waiting %.1f s", self.entry_id, wait)
                    await asyncio.sleep(wait)
                    continue
                self._rate_limited_until = time.time() + wait
                self._fail_if_rate_limited()
            location = answer.headers.get("Location", "")
            if answer.status in (301, 302, 307, 308) and not redirected and location.startswith(self.api_url + "/"):
                url, redirected = location, True  # a renamed repo; never follow off the API host with a JWT
                continue
            return answer

    def _fail_if_rate_limited(self) -> None:
        remaining = self._rate_limited_until - time.time()
        if remaining > 0:
            resets = datetime.fromtimestamp(self._rate_limited_until, UTC).strftime("%H:%M:%S UTC")
            raise RateLimited(
                f"GitHub rate limit reached for {self.entry_id!r}; it resets at {resets} (in {remaining:.0f} s)"
            )

    async def _send_once(self, method: str, url: str, body: dict[str, Any] | None, budget: float) -> _Answer:
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": f"git-token-proxy/{__version__}",
            "Authorization": f"Bearer {self._signed_jwt()}",
        }
        async with self._session.request(
            method, url, headers=headers, json=body, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=max(budget, 0.001)),
        ) as response:  # fmt: skip
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = None
            return _Answer(
                response.status, data if isinstance(data, dict) else {}, response.headers, _date_of(response)
            )


def _date_of(response: aiohttp.ClientResponse) -> float | None:
    try:
        return parsedate_to_datetime(response.headers["Date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _rate_limit_wait(answer: _Answer) -> float | None:
    """Seconds to wait if this is a rate limit (primary or secondary), else None."""
    if answer.status not in (403, 429):
        return None
    headers = answer.headers
    if "Retry-After" in headers:
        try:
            return max(0.0, float(headers["Retry-After"]))
        except ValueError:
            return 60.0
    if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
        now = answer.server_time if answer.server_time is not None else time.time()
        return max(0.0, float(headers["x-ratelimit-reset"]) - now)
    if answer.status == 429 or "rate limit" in answer.message.lower():
        return 60.0  # GitHub's advice for secondary limits without a header: wait at least a minute
    return None


async def _backoff(tries: int, deadline: float) -> bool:
    """Exponential backoff with jitter; False when the wait would pass the deadline."""
    delay = min(0.25 * 2 ** (tries - 1), 4.0) * random.uniform(0.5, 1.5)
    if asyncio.get_running_loop().time() + delay >= deadline:
        return False
    await asyncio.sleep(delay)
    return True


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect ({error.strerror})"
    return type(error).__name__
