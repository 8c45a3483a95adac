"""GitHub's answers taken on no trust: strict models, clamped header numbers, sanitised messages."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from proxy.credentials.answers import (
    DEFAULT_WAIT,
    MAX_BODY,
    MAX_MESSAGE,
    MAX_MINT_BODY,
    MAX_SKEW,
    MAX_TOKEN_LIFETIME,
    MAX_WAIT,
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
from proxy.errors import GitHubRefused, MalformedAnswer
from proxy.testing.github_objects import repository_object

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJJdjIzbGkxMjM0In0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"


def soon(seconds: float = 3600) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_body(**changes: Any) -> bytes:
    answer = {"token": "ghs_abcdefABCDEF0123456789", "expires_at": soon(), "permissions": {"contents": "read"}}
    answer.update(changes)
    return json.dumps({k: v for k, v in answer.items() if v is not ...}).encode()


# ------------------------------------------------------------ models


def test_a_good_token_answer_parses() -> None:
    parsed = parse_answer(TokenAnswer, token_body(repositories=[{"name": "app", "full_name": "acme/app"}]), "mint")
    assert parsed.token.startswith("ghs_") and parsed.permissions == {"contents": "read"}
    assert parsed.expires_at.tzinfo is not None


def test_a_mint_answer_listing_many_full_repositories_parses() -> None:
    """GitHub lists every selected repository as a full repository object: 400 of them are over 2 MiB, twice the
    cap of other answers (issue 18: past about 180, the token was lost and minting paused)."""
    repositories = [repository_object(f"acme/repo-{i}", 1000 + i) for i in range(400)]
    body = token_body(repositories=repositories)
    assert len(body) > 2 * MAX_BODY
    assert parse_answer(TokenAnswer, body, "mint", MAX_MINT_BODY).token.startswith("ghs_")
    with pytest.raises(MalformedAnswer, match="over 65536 KiB"):
        parse_answer(TokenAnswer, None, "mint", MAX_MINT_BODY)


@pytest.mark.parametrize(
    "changes",
    [
        {"permissions": "abc"},
        {"permissions": {"contents": 1}},
        {"token": ""},
        {"token": "ghs_abc def"},
        {"token": "ghs_abc\r\nX-Injected: 1"},
        {"token": 12345},
        {"token": ...},
        {"expires_at": "never"},
        {"expires_at": "2024-06-01T12:00:00"},  # naive: no time zone
        {"expires_at": "99999999999999999999-01-01T00:00:00Z"},
        {"expires_at": "1970-01-01T00:00:00Z"},  # not within a day of now
        {"expires_at": 1_900_000_000},
        {"expires_at": ...},
    ],
)
def test_malformed_token_answers_are_one_github_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedAnswer, match=r"^mint is malformed: ") as error:
        parse_answer(TokenAnswer, token_body(**changes), "mint")
    assert isinstance(error.value, GitHubRefused)
    assert "ghs_abc" not in str(error.value)  # a field is named, its value never shown


@pytest.mark.parametrize("body", [b'{"id": true}', b'{"id": -1}', b'{"id": 0}', b'{"id": "5"}', b'{"id": 5.0}',
                                  b'{"id": 1e400}', b'{"id": 99999999999999999999999}', b"[]", b"", b"{"])  # fmt: skip
def test_installation_ids_are_strict_positive_integers(body: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        parse_answer(InstallationAnswer, body, "look-up")


def test_a_valid_installation_id() -> None:
    assert parse_answer(InstallationAnswer, b'{"id": 1001, "account": {"login": "acme"}}', "look-up").id == 1001


def test_deep_nesting_and_oversized_answers_are_malformed_not_crashes() -> None:
    with pytest.raises(MalformedAnswer):
        parse_answer(InstallationAnswer, b"[" * 100_000 + b"]" * 100_000, "look-up")
    with pytest.raises(MalformedAnswer, match="over 1024 KiB"):
        parse_answer(AppAnswer, None, "GET /app")


def test_rate_limit_answer_shape() -> None:
    window = {"limit": 5000, "used": 1, "remaining": 4999, "reset": 1_700_000_000}
    both = json.dumps({"resources": {"core": window}, "rate": window}).encode()  # API version 2022-11-28
    assert parse_answer(RateLimitAnswer, both, "x").resources.core.limit == 5000
    newer = json.dumps({"resources": {"core": window, "search": window}}).encode()  # 2026-03-10: no `rate`
    assert parse_answer(RateLimitAnswer, newer, "x").resources.core.remaining == window["remaining"]
    with pytest.raises(MalformedAnswer):
        parse_answer(RateLimitAnswer, b'{"resources": {"core": {"limit": true, "remaining": 1, "reset": 1}}}', "x")


# ------------------------------------------------------------ header numbers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # Longer than any window GitHub has: not GitHub's, so unreadable (issue 18: 1e300 kept /readyz down 1 h).
        ({"Retry-After": "inf"}, DEFAULT_WAIT),
        ({"Retry-After": "1e20"}, DEFAULT_WAIT),
        ({"Retry-After": "1e300"}, DEFAULT_WAIT),
        ({"Retry-After": "1000000000"}, DEFAULT_WAIT),
        ({"Retry-After": "3600"}, MAX_WAIT),
        ({"Retry-After": "-inf"}, 0.0),
        ({"Retry-After": "nan"}, DEFAULT_WAIT),
        ({"Retry-After": "soon"}, DEFAULT_WAIT),
        ({"Retry-After": "9" * 400}, DEFAULT_WAIT),
        ({"Retry-After": "30"}, 30.0),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1e300"}, DEFAULT_WAIT),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "inf"}, DEFAULT_WAIT),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "nan"}, DEFAULT_WAIT),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "tomorrow"}, DEFAULT_WAIT),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "0"}, 0.0),
    ],
)
def test_rate_limit_waits_are_clamped_and_never_raise(headers: dict[str, str], expected: float) -> None:
    assert rate_limit_wait(429, headers, "", None) == expected


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (rate_limit_wait(403, {"Retry-After": when}, "", None) or 0) <= 120


def test_reset_is_judged_on_githubs_clock_but_within_the_skew_allowance() -> None:
    now = time.time()
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(now + 100))}
    assert 95 < (rate_limit_wait(403, headers, "", now) or 0) <= 100
    assert rate_limit_wait(403, headers, "", now - 10 * MAX_SKEW) == pytest.approx(100 + MAX_SKEW, abs=5)


def test_not_a_rate_limit() -> None:
    assert rate_limit_wait(403, {}, "Resource not accessible by integration", None) is None
    assert rate_limit_wait(404, {"Retry-After": "inf"}, "", None) is None
    assert rate_limit_wait(403, {}, "API rate limit exceeded", None) == DEFAULT_WAIT


@pytest.mark.parametrize(
    "value",
    [
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "yesterday",
        "",
        None,
        "Mon, 32 Foo 2024 99:99:99 GMT",
        "x" * 10_000,
    ],
)
def test_unreadable_or_absurd_dates_are_ignored(value: str | None) -> None:
    assert parse_date(value, time.time()) is None


def test_a_good_date_is_read() -> None:
    now = time.time()
    assert parse_date(format_datetime(datetime.fromtimestamp(now + 300, UTC), usegmt=True), now) == int(now + 300)


def test_githubs_clock_is_never_trusted_beyond_the_skew_allowance() -> None:
    now = 1_800_000_000.0
    assert github_now(now - 1e9, 0.0, now) == now - MAX_SKEW
    assert github_now(None, 5000.0, now) == now + MAX_SKEW
    assert github_now(now + 120, 0.0, now) == now + 120


def test_token_lifetime_never_exceeds_githubs_maximum() -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    assert token_lifetime(expires, 0.0) == MAX_TOKEN_LIFETIME  # a Date of 1970 claims 1.8e9 s
    assert token_lifetime(expires, time.time()) == pytest.approx(3600, abs=5)


# ------------------------------------------------------------ messages


def test_messages_lose_escapes_and_line_breaks() -> None:
    cleaned = sanitise_message("\x1b[31mred\x1b[0m\nremote: forged line\r\x07\x1b]0;title\x07 end\u202e")
    assert cleaned == "red remote: forged line end"


def test_messages_are_bounded() -> None:
    cleaned = sanitise_message("x" * 10_000_000)
    assert len(cleaned) == MAX_MESSAGE and cleaned.endswith("…")


@pytest.mark.parametrize(
    "secret", [JWT, "ghs_" + "a" * 36, "Bearer " + "b" * 40, "ghs_1234_" + JWT, "github_pat_" + "c" * 60]
)
def test_messages_never_echo_a_secret(secret: str) -> None:
    cleaned = sanitise_message(f"'Issued at' claim of {secret} is invalid")
    assert secret not in cleaned and secret[8:24] not in cleaned
    assert cleaned.startswith("'Issued at' claim of")


def test_an_escape_sequence_cannot_split_a_secret_past_the_redactor() -> None:
    cleaned = sanitise_message(f"token {JWT[:20]}\x1b[0m{JWT[20:]}")
    assert JWT[30:50] not in cleaned


def test_validation_reasons_are_short_and_clean() -> None:
    hostile_key = "\x1b[2J" + "k" * 5000
    with pytest.raises(MalformedAnswer) as error:
        parse_answer(TokenAnswer, token_body(permissions={hostile_key: 7}), "mint")
    assert len(str(error.value)) < 200 and "\x1b" not in str(error.value)
