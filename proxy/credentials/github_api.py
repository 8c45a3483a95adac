"""GitHub's App API: a JWT signed on GitHub's clock, installation look-ups and token mints, retried where it helps."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from .. import __version__
from ..bodies import read_capped
from ..errors import (
    CredentialError,
    GitHubRefused,
    GitHubUnavailable,
    InstallationGone,
    JwtRejected,
    MalformedAnswer,
    RateLimited,
)
from .answers import (
    MAX_BODY,
    MAX_MINT_BODY,
    MAX_SKEW,
    AppAnswer,
    InstallationAnswer,
    RateLimitAnswer,
    TokenAnswer,
    github_now,
    parse_answer,
    parse_date,
    rate_limit_wait,
    sanitise_message,
    token_lifetime,
)
from .keys import AppKey

log = logging.getLogger("git_token_proxy.github_api")

API_VERSION = "2022-11-28"
# GitHub rejects an `iat` in its future and an `exp` more than 10 minutes ahead. Backdating `iat` by a minute and
# keeping `exp` 9 minutes ahead leaves room for a clock that is off by up to a minute either way.
JWT_BACKDATE = 60
JWT_LIFETIME = 540
JWT_REUSE = 480  # re-sign after 8 minutes, well before the 9-minute `exp`
MAX_TRIES = 3
SHORT_RATE_LIMIT_WAIT = 10.0  # waits up to this long are sat out; longer ones fail fast with a 503
_SKEW_MESSAGES = ("'Issued at'", "'Expiration time'")


@dataclass(frozen=True)
class MintedToken:
    token: str = field(repr=False)
    expires_at: datetime
    lifetime: float  # seconds it had left when minted, on GitHub's clock, clamped to GitHub's maximum
    permissions: dict[str, str]


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes | None  # None: larger than MAX_BODY, left unread
    headers: CIMultiDictProxy[str]
    server_time: float | None  # GitHub's clock, from the Date header (None when absent or absurd)
    limit: int = MAX_BODY  # what the body was read up to

    @cached_property
    def message(self) -> str:
        """GitHub's own words, sanitised: safe for a terminal and a log line. Parsed only when someone asks."""
        return _message_of(self.status, self.body, self.limit)


class GitHubAppApi:
    """One per app entry. Holds the app's key, the last JWT and the clock offset learned from GitHub."""

    def __init__(
        self, *, entry_id: str, api_url: str, issuer: str, key: AppKey, session: aiohttp.ClientSession,
        timeout: float,
    ) -> None:  # fmt: skip
        # PyJWT (about 1.5 MiB of RSS) is imported with the first app entry, at start-up or on a reload, rather
        # than with this module: `serve` imports the module for every config, and static tokens never sign a JWT.
        import jwt

        self._encode_jwt = jwt.encode
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

    def forget_failures(self) -> None:
        """A reload: GitHub gets asked again at once, whatever rate limit it announced."""
        self._rate_limited_until = 0.0

    # ------------------------------------------------------------ the calls

    async def get_app(self) -> dict[str, Any]:
        answer = await self._call("GET", "/app")
        if answer.status != 200:
            raise GitHubRefused(f"GitHub refused GET /app for {self.entry_id!r}: {answer.message}")
        return parse_answer(AppAnswer, answer.body, f"GitHub's answer to GET /app for {self.entry_id!r}").model_dump()

    async def find_owner_installation(self, owner: str) -> int | None:
        """The app's installation on an account, or None when it has none there (or cannot see it). An
        organisation answers on /orgs, a user on /users: the other one is a 404, so both are asked in turn."""
        for kind in ("orgs", "users"):
            answer = await self._call("GET", f"/{kind}/{owner}/installation")
            if answer.status != 404:
                return self._installation_id(answer, owner)
        return None

    async def find_repo_installation(self, owner: str, repo: str) -> int | None:
        """The installation that can see one repo. Not on the data path (see GitHubAppSource): a diagnostic that
        tells "installed, but this repo is not selected" apart, for `check --repo`."""
        answer = await self._call("GET", f"/repos/{owner}/{repo}/installation")
        return None if answer.status == 404 else self._installation_id(answer, f"{owner}/{repo}")

    async def installation_permissions(self, owner: str) -> dict[str, str] | None:
        """The permissions the app's installation on `owner` holds, for a message only: None when they cannot be
        had, and never an error (the refusal being explained is the error)."""
        with contextlib.suppress(CredentialError):
            for kind in ("orgs", "users"):
                answer = await self._call("GET", f"/{kind}/{owner}/installation")
                if answer.status != 404:
                    return _permissions_in(answer) if answer.status == 200 else None
        return None

    def _installation_id(self, answer: _Answer, where: str) -> int:
        what = f"the installation look-up of {self.entry_id!r} for {where}"
        if answer.status != 200:
            raise GitHubRefused(f"GitHub refused {what}: {answer.message}")
        return parse_answer(InstallationAnswer, answer.body, f"GitHub's answer to {what}").id

    async def create_installation_token(self, installation_id: int, scope: dict[str, Any] | None = None) -> MintedToken:
        path = f"/app/installations/{installation_id}/access_tokens"
        answer = await self._call("POST", path, body=scope, limit=MAX_MINT_BODY)
        if answer.status == 404:
            raise InstallationGone(installation_id, f"installation {installation_id} of {self.entry_id!r} is gone")
        what = f"GitHub's new token for {self.entry_id!r}"
        if 200 <= answer.status < 300 and answer.status != 201:
            # A success of the wrong kind may well carry a token that is now lost: paused like a malformed 201.
            raise MalformedAnswer(f"{what} is malformed: HTTP {answer.status} instead of 201")
        if answer.status != 201:
            raise GitHubRefused(f"GitHub refused to mint a token for {self.entry_id!r}: {answer.message}")
        # A large answer (many selected repositories) is parsed off the event loop: transfers must not wait on it.
        parse = functools.partial(parse_answer, TokenAnswer, answer.body, what, MAX_MINT_BODY)
        parsed = await asyncio.to_thread(parse) if len(answer.body or b"") > MAX_BODY else parse()
        lifetime = token_lifetime(parsed.expires_at, github_now(answer.server_time, self._skew, time.time()))
        if lifetime <= 0:
            raise MalformedAnswer(f"{what} is malformed: it expired before it arrived")
        return MintedToken(
            token=parsed.token,
            expires_at=parsed.expires_at,
            lifetime=lifetime,
            permissions=dict(parsed.permissions),
        )

    async def token_is_alive(self, token: str) -> bool:
        """Asks GitHub about an installation token with the token itself: GET /rate_limit, which costs no quota.
        False on a 401 (revoked or expired); raises a CredentialError when GitHub gives no clear answer."""
        try:
            answer = await self._send_once("GET", f"{self.api_url}/rate_limit", None, self.timeout, f"token {token}")
        except (TimeoutError, aiohttp.ClientError) as error:
            raise GitHubUnavailable(f"GitHub API unreachable for {self.entry_id!r}: {_describe(error)}") from None
        if answer.status == 401:
            return False
        if answer.status != 200:
            raise GitHubRefused(f"GitHub answered HTTP {answer.status} to a token check for {self.entry_id!r}")
        parse_answer(RateLimitAnswer, answer.body, f"GitHub's answer to a token check for {self.entry_id!r}")
        return True

    async def revoke_token(self, token: str, budget: float) -> bool:
        """DELETE /installation/token, with the token itself: True when GitHub revoked it (204) or no longer knew
        it (401). Never retried: it runs at shutdown, within what is left of the grace."""
        try:
            answer = await self._send_once(
                "DELETE", f"{self.api_url}/installation/token", None, budget, f"token {token}"
            )
        except (TimeoutError, aiohttp.ClientError):
            return False
        return answer.status in (204, 401)

    # ------------------------------------------------------------ JWT

    def _signed_jwt(self) -> str:
        if self._jwt is None or time.monotonic() - self._jwt_signed_at > JWT_REUSE:
            now = int(time.time() + self._skew)
            claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self.issuer}
            self._jwt = self._encode_jwt(claims, self._key.key, algorithm="RS256")
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

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, limit: int = MAX_BODY) -> _Answer:
        self._fail_if_rate_limited()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        url, tries, skew_retried, redirected = f"{self.api_url}{path}", 0, False, False
        while True:
            tries += 1
            # Each try gets its share of what is left, so one hung connection cannot eat every retry's time.
            budget = (deadline - loop.time()) / max(1, MAX_TRIES - tries + 1)
            try:
                answer = await self._send_once(method, url, body, budget, f"Bearer {self._signed_jwt()}", limit)
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
                hint = _jwt_hint(answer.message, self.issuer)
                raise JwtRejected(f"GitHub rejected the JWT for {self.entry_id!r}: {answer.message}{hint}")
            if await self._waited_out_rate_limit(answer, tries, deadline):
                continue
            location = answer.headers.get("Location", "")
            if answer.status in (301, 302, 307, 308) and not redirected and location.startswith(self.api_url + "/"):
                url, redirected = location, True  # a renamed account; never follow off the API host with a JWT
                continue
            return answer

    async def _waited_out_rate_limit(self, answer: _Answer, tries: int, deadline: float) -> bool:
        """True after sitting out a short rate limit; raises RateLimited for a long one; False if there is none."""
        wait = rate_limit_wait(answer.status, answer.headers, answer.message, answer.server_time)
        if wait is None:
            return False
        wait = max(wait, 1.0)  # a reset "now" (clocks differ) must not become a busy loop
        if wait <= SHORT_RATE_LIMIT_WAIT and tries < MAX_TRIES and asyncio.get_running_loop().time() + wait < deadline:
            log.info("entry %r: GitHub rate limit, waiting %.1f s", self.entry_id, wait)
            await asyncio.sleep(wait)
            return True
        self._rate_limited_until = time.time() + wait  # at most MAX_WAIT ahead: rate_limit_wait clamps
        self._fail_if_rate_limited()
        return False  # not reached: the window just set is still open

    def _fail_if_rate_limited(self) -> None:
        remaining = self._rate_limited_until - time.time()
        if remaining > 0:
            resets = datetime.fromtimestamp(self._rate_limited_until, UTC).strftime("%H:%M:%S UTC")
            raise RateLimited(
                f"GitHub rate limit reached for {self.entry_id!r}; it resets at {resets} (in {remaining:.0f} s)"
            )

    async def _send_once(
        self, method: str, url: str, body: dict[str, Any] | None, budget: float, authorization: str,
        limit: int = MAX_BODY,
    ) -> _Answer:  # fmt: skip
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": f"git-token-proxy/{__version__}",
            "Authorization": authorization,
        }
        async with self._session.request(
            method, url, headers=headers, json=body, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=max(budget, 0.001)),
        ) as response:  # fmt: skip
            server_time = parse_date(response.headers.get("Date"), time.time())
            # The larger cap is for the answer it was made for (a mint's 201); an error is a message, and small.
            limit = limit if 200 <= response.status < 300 else MAX_BODY
            read = await read_capped(response, limit)
            return _Answer(response.status, read, response.headers, server_time, limit)


def _message_of(status: int, body: bytes | None, limit: int) -> str:
    if body is None:
        return f"HTTP {status} (an answer over {limit // 1024} KiB, not read)"
    if len(body) > MAX_BODY:
        return f"HTTP {status}"  # a message is a line: a huge error body is not parsed on the event loop for it
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested document
        data = None
    message = data.get("message") if isinstance(data, dict) else None
    return sanitise_message(message) if isinstance(message, str) and message.strip() else f"HTTP {status}"


def _issuer_text(issuer: str) -> str:
    return f"appId {issuer}" if issuer.isdigit() else f"clientId {issuer!r}"


def _jwt_hint(message: str, issuer: str) -> str:
    """GitHub's words stay; what they mean for this config follows them."""
    if "could not be decoded" in message:
        return (
            f" (the private key does not belong to the app with {_issuer_text(issuer)}: use that app's key, "
            "from its settings page, or fix clientId/appId)"
        )
    if "Integration not found" in message:
        return (
            f" (no GitHub App has {_issuer_text(issuer)}: copy the Client ID from the app's settings page, "
            "and check apiUrl for GitHub Enterprise)"
        )
    return ""


def _permissions_in(answer: _Answer) -> dict[str, str] | None:
    """`permissions` of an installation answer, read leniently: it only goes into a message."""
    try:
        data = json.loads(answer.body or b"")
    except (ValueError, RecursionError):
        return None
    permissions = data.get("permissions") if isinstance(data, dict) else None
    if not isinstance(permissions, dict):
        return None
    return {sanitise_message(str(k))[:50]: sanitise_message(str(v))[:20] for k, v in list(permissions.items())[:50]}


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
