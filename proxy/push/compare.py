"""GitHub's compare API as the fast-forward check's oracle: is `base` an ancestor of `head`, on GitHub?"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, Self
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import __version__
from ..bodies import read_capped
from .ancestry import Ancestry, CompareFailed, CompareFn, UnknownCommit

# An answer lists up to 300 changed files with their patches: megabytes for a big diff. Only three numbers are
# read; past this much (decompressed), the answer is not read at all.
MAX_ANSWER = 8 << 20
MAX_ERROR_ANSWER = 64 << 10
TIMEOUT = 10.0  # one API call, not a transfer: a total timeout is right here
API_VERSION = "2022-11-28"  # as credentials.github_api sends (not imported: it loads the GitHub App stack)
_OBJECT_ID = re.compile(r"[0-9a-f]{40}")
_NO_COMMON_ANCESTOR = "No common ancestor between"  # GitHub's 404 for unrelated histories: both commits exist
Count = Annotated[int, Field(ge=0, lt=2**31)]


class CompareAnswer(BaseModel):
    """GET /repos/{owner}/{repo}/compare/{base}...{head}: only what the decision needs, and consistent with itself
    (an `ahead` that is also behind is not an answer)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    status: Literal["ahead", "behind", "identical", "diverged"]
    ahead_by: Count
    behind_by: Count

    @model_validator(mode="after")
    def _counts_agree(self) -> Self:
        expected = {
            "identical": (False, False), "ahead": (True, False), "behind": (False, True), "diverged": (True, True)
        }[self.status]  # fmt: skip
        if (self.ahead_by > 0, self.behind_by > 0) != expected:
            raise ValueError(f"status {self.status!r} with ahead_by {self.ahead_by}, behind_by {self.behind_by}")
        return self


def github_compare(
    session: aiohttp.ClientSession, api_url: str, owner: str, repo: str, authorization: str, *,
    timeout: float = TIMEOUT,
) -> CompareFn:  # fmt: skip
    """A CompareFn for one repo and credential. `session` must decompress answers (the API session)."""

    async def compare(base: str, head: str) -> Ancestry:
        return await compare_commits(session, api_url, owner, repo, authorization, base, head, within=timeout)

    return compare


async def compare_commits(
    session: aiohttp.ClientSession, api_url: str, owner: str, repo: str, authorization: str, base: str, head: str,
    *, within: float = TIMEOUT,
) -> Ancestry:  # fmt: skip
    """Where `head` stands from `base`. Raises UnknownCommit when GitHub does not have one of them (404), and
    CompareFailed for anything else that is not a clear answer."""
    if not (_OBJECT_ID.fullmatch(base) and _OBJECT_ID.fullmatch(head)):
        raise CompareFailed("only commit ids are compared")
    url = f"{api_url.rstrip('/')}/repos/{quote(owner, safe='')}/{quote(repo, safe='')}/compare/{base}...{head}"
    headers = {
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
        "User-Agent": f"git-token-proxy/{__version__}",
        "Authorization": authorization,
    }
    try:
        async with session.get(
            url, params={"per_page": "1"}, headers=headers, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as response:  # fmt: skip
            limit = MAX_ANSWER if response.status == 200 else MAX_ERROR_ANSWER
            body = await read_capped(response, limit)
            status = response.status
    except TimeoutError:
        raise CompareFailed(f"no answer within {within:.0f} s") from None
    except aiohttp.ClientError as error:
        raise CompareFailed(f"unreachable: {type(error).__name__}") from None
    return _ancestry(status, body)


def _ancestry(status: int, body: bytes | None) -> Ancestry:
    if status == 404:
        if _NO_COMMON_ANCESTOR in _message(body):
            return Ancestry.DIVERGED
        raise UnknownCommit
    if status != 200:
        raise CompareFailed(f"HTTP {status}")
    if body is None:
        raise CompareFailed(f"an answer over {MAX_ANSWER >> 20} MiB")
    try:
        return Ancestry(CompareAnswer.model_validate_json(body).status)
    except ValidationError:
        raise CompareFailed("a malformed answer") from None


def _message(body: bytes | None) -> str:
    try:
        data = json.loads(body or b"")
    except (ValueError, RecursionError):
        return ""
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) else ""
