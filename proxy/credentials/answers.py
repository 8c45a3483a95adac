"""GitHub's API answers, taken on no trust: strict models, clamped header numbers, and messages fit to show a user."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import MalformedAnswer
from ..logs import redact_shapes

MAX_BODY = 1024 * 1024  # an API answer is a few KiB; past this (decompressed), it is refused unread
# A mint answer lists the selected repositories in full (about 5.6 KiB each): 64 MiB is over 11,000 of them. It is one
# answer an hour per installation, and losing it loses a token that was made.
MAX_MINT_BODY = 64 * 1024 * 1024
MAX_MESSAGE = 300  # GitHub's message as a git user reads it after `remote:`, and as the audit log keeps it
MAX_WAIT = 3600.0  # GitHub's longest window (the hourly reset): a longer wait is not GitHub's, and not believed
DEFAULT_WAIT = 60.0  # GitHub's advice for a secondary limit that names no time; also for a time we cannot read
MAX_SKEW = 600  # never trust a Date header further off than 10 minutes
MAX_TOKEN_LIFETIME = 3600 + MAX_SKEW  # GitHub's tokens live one hour; the rest is room for a skewed clock
_ABSURD_DATE = 86400.0  # a Date more than a day off this clock is a broken header, not a skewed clock


# ------------------------------------------------------------ models


class _Answer(BaseModel):
    # strict: `true` is not the id 1, `"5"` is not 5. Unknown fields are GitHub's business.
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


Id = Annotated[int, Field(gt=0, lt=2**63)]
_Printable = r"^[^\x00-\x1f\x7f]*$"
Name = Annotated[str, Field(min_length=1, max_length=255, pattern=_Printable)]
Word = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
# Printable ASCII without spaces: it goes into an Authorization header, where anything else could inject one.
Token = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[\x21-\x7e]+$")]


class InstallationAnswer(_Answer):
    """GET /orgs/{owner}/installation, /users/{owner}/installation, /repos/{owner}/{repo}/installation."""

    id: Id


class AppAnswer(_Answer):
    """GET /app. GitHub's `integration` schema does not require `slug`: only `id` is needed here."""

    id: Id
    slug: Name | None = None
    name: Name | None = None


class TokenAnswer(_Answer):
    """POST /app/installations/{id}/access_tokens. Only what is used is read: `repositories` lists every selected
    repository as a full repository object (GitHub's example is 5.6 KiB), and is skipped unread."""

    token: Token
    expires_at: AwareDatetime
    permissions: Annotated[dict[Word, Word], Field(max_length=200)] = {}

    @field_validator("expires_at")
    @classmethod
    def _within_a_day(cls, value: datetime) -> datetime:
        if abs(value.timestamp() - time.time()) > _ABSURD_DATE:
            raise ValueError("not within a day of this clock")
        return value


class RateWindow(_Answer):
    limit: Annotated[int, Field(ge=0, lt=2**63)]
    remaining: Annotated[int, Field(ge=0, lt=2**63)]
    reset: Annotated[int, Field(ge=0, lt=2**63)]


class RateResources(_Answer):
    core: RateWindow


class RateLimitAnswer(_Answer):
    """GET /rate_limit, asked with an installation token. `resources.core`, which every API version has: the
    top-level `rate` is gone from 2026-03-10 on."""

    resources: RateResources


A = TypeVar("A", bound=_Answer)


def parse_answer(model: type[A], body: bytes | None, what: str, limit: int = MAX_BODY) -> A:
    """`body` is None when the answer was larger than `limit` to read. Every failure is one MalformedAnswer,
    naming the first bad field but never its value (it could be a token)."""
    if body is None:
        raise MalformedAnswer(f"{what} is malformed: over {limit // 1024} KiB")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise MalformedAnswer(f"{what} is malformed: {_first_problem(error)}") from None


def _first_problem(error: ValidationError) -> str:
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    if not problems:
        return "invalid"
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    return sanitise_message(f"{where}: {first['msg']}" if where else first["msg"], 120)


# ------------------------------------------------------------ messages

_PRE_CUT = 16 * 1024  # only the start of a message can survive; redacting more would only cost time
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_])")


def sanitise_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """What GitHub says, made safe to send to a terminal and a log line: no escape sequences, no control or line
    characters, no token or JWT it echoed, and at most `limit` characters."""
    text = _ANSI.sub("", text[:_PRE_CUT])
    text = " ".join("".join(char if char.isprintable() else " " for char in text).split())
    # The log layer's patterns (tokens, JWTs, keys), applied after the clean-up, so that an escape sequence cannot
    # split a secret's shape and have it pass.
    text = redact_shapes(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------ numbers from headers


def clamp_wait(seconds: float) -> float:
    """A wait GitHub asked for, at least 0. GitHub's windows reset within the hour, so a wait longer than that
    (`1e300`, `inf`) is not GitHub's: it counts as unreadable (DEFAULT_WAIT), like `nan`. Clamping it to the hour
    instead would let one garbage header keep an entry (and /readyz) down for that hour."""
    if not seconds <= MAX_WAIT:  # `not <=`: NaN too
        return DEFAULT_WAIT
    return max(seconds, 0.0)


def _number(value: str) -> float | None:
    try:
        return float(value) if len(value) <= 64 else None
    except ValueError:
        return None


def parse_date(value: str | None, now: float) -> float | None:
    """GitHub's clock from a Date header; None when absent, unreadable or absurd (more than a day off ours)."""
    if not value or len(value) > 64:
        return None
    try:
        stamp = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return stamp if math.isfinite(stamp) and abs(stamp - now) <= _ABSURD_DATE else None


def github_now(server_time: float | None, skew: float, now: float) -> float:
    """GitHub's clock, at most MAX_SKEW from ours whatever a header says."""
    guess = server_time if server_time is not None else now + skew
    return min(max(guess, now - MAX_SKEW), now + MAX_SKEW)


def _retry_after(value: str, now: float) -> float:
    seconds = _number(value)
    if seconds is None:
        at = parse_date(value, now)  # RFC 9110 also allows an HTTP date
        seconds = at - now if at is not None else DEFAULT_WAIT
    return clamp_wait(seconds)


def rate_limit_wait(status: int, headers: Mapping[str, str], message: str, server_time: float | None) -> float | None:
    """Seconds to wait if this is a rate limit (primary or secondary), else None. Never raises, never above
    MAX_WAIT: a header GitHub got wrong costs at most an hour, and a reload clears even that."""
    if status not in (403, 429):
        return None
    now = time.time()
    if "Retry-After" in headers:
        return _retry_after(headers["Retry-After"], now)
    if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
        reset = _number(headers["x-ratelimit-reset"])
        return clamp_wait(reset - github_now(server_time, 0.0, now)) if reset is not None else DEFAULT_WAIT
    if status == 429 or "rate limit" in message.lower():
        return DEFAULT_WAIT
    return None


def token_lifetime(expires_at: datetime, server_now: float) -> float:
    """Seconds a fresh token has left, at most GitHub's maximum whatever `expires_at` and `Date` claim."""
    return min(expires_at.timestamp() - server_now, float(MAX_TOKEN_LIFETIME))
