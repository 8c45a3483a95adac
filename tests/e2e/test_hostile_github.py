"""A GitHub at its worst, end to end through the real proxy and real git: malformed and hostile API answers, extreme
headers, upstreams that reject every token, dead tokens answered with 404 as github.com does, and key rotation."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
import jwt
import pytest

from proxy.credentials.answers import MAX_TOKEN_LIFETIME
from proxy.credentials.github_app import MALFORMED_MINT_PAUSE
from proxy.testing import CannedAnswer, FakeGitHub, generate_app_key, pkcs1_pem
from proxy.testing.process import ServeProcess
from tests.e2e.test_github_app import clone, refused_clone
from tests.support import AcmeApp, Git, StartProxy, app_config
from tests.test_metrics import scrape, value

JWT_SHAPED = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJJdjIzbGkxMjM0In0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"


async def info_refs(proxy: str, repo: str, times: int = 1, parallel: int = 1) -> list[tuple[int, str]]:
    """GET info/refs (what opens every clone) `times` times, `parallel` at once; (status, body) of each."""
    url = f"{proxy}/github.com/{repo}.git/info/refs?service=git-upload-pack"
    gate = asyncio.Semaphore(parallel)

    async def one(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with gate, session.get(url) as response:
            return response.status, await response.text(errors="replace")

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session) for _ in range(times))))


def statuses(answers: list[tuple[int, str]]) -> set[int]:
    return {status for status, _ in answers}


# ------------------------------------------------------------ malformed answers


MALFORMED_MINTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "permissions-a-string": lambda answer: {**answer, "permissions": "abc"},
    "permissions-a-number": lambda answer: {**answer, "permissions": 5},
    "expires-at-not-a-date": lambda answer: {**answer, "expires_at": "never"},
    "token-with-a-line-break": lambda answer: {**answer, "token": answer["token"] + "\r\nX-Injected: 1"},
    "not-an-object": lambda answer: [answer],
}


@pytest.mark.parametrize("mangle", MALFORMED_MINTS.values(), ids=MALFORMED_MINTS.keys())
async def test_a_malformed_mint_answer_is_one_502_and_one_mint(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, mangle: Any
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.mangle_mints = mangle
    answers = await info_refs(proxy, "acme/private", times=5)
    assert statuses(answers) == {502}
    assert all("GitHub's new token for 'acme-app' is malformed" in text for _, text in answers)
    assert len(fake_github.apps.minted_tokens) == 1  # the lost token is not followed by one mint per request
    samples = await scrape(proxy)
    assert value(samples, "git_token_proxy_token_mint_failures_total", entry="acme-app", reason="upstream_error") == 5

    fake_github.apps.mangle_mints = None
    await asyncio.sleep(MALFORMED_MINT_PAUSE + 0.2)  # the pause after a lost token; nothing of it is cached
    await clone(git, proxy, "acme/private", "recovered")


@pytest.mark.parametrize("body", [{"id": True}, {"id": -1}, {"id": "1001"}, {"nothing": "here"}])
async def test_installation_ids_must_be_positive_integers(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, body: dict[str, Any]
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.script_next("lookup", CannedAnswer.json(200, body))
    [(status, text)] = await info_refs(proxy, "acme/private")
    assert status == 502 and "is malformed: id" in text
    assert fake_github.apps.statuses("mint") == []  # no mint for an id GitHub never gave
    await clone(git, proxy, "acme/private", "recovered")  # nothing was cached: not "not installed" for an hour


async def test_a_gzip_bomb_is_refused_unread(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    bomb = CannedAnswer.gzip_bomb(size_mib=256)
    assert len(bomb.body) < 1024 * 1024
    fake_github.apps.script_next("lookup", bomb)
    [(status, text)] = await info_refs(proxy, "acme/private")
    assert status == 502 and "malformed: over 1024 KiB" in text
    await clone(git, proxy, "acme/private", "recovered")


# ------------------------------------------------------------ extreme headers


RATE_LIMITS = {
    "retry-after-inf": {"Retry-After": "inf"},
    "retry-after-1e300": {"Retry-After": "1e300"},
    "retry-after-1e20": {"Retry-After": "1e20"},
    "retry-after-31-years": {"Retry-After": "1000000000"},
    "reset-1e300": {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1e300"},
    "reset-not-a-number": {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "soon"},
}


@pytest.mark.parametrize("headers", RATE_LIMITS.values(), ids=RATE_LIMITS.keys())
async def test_rate_limit_headers_longer_than_any_github_window_count_as_unreadable(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, headers: dict[str, str]
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.script_next("mint", CannedAnswer.error(429, "You have exceeded a secondary rate limit.", headers))
    answers = await info_refs(proxy, "acme/private", times=3)
    assert statuses(answers) == {503}  # never a 500, for this request or any later one
    seconds = int(answers[-1][1].rsplit("(in ", 1)[1].split(" s)")[0])
    # Over an hour is not GitHub's (its windows reset hourly): the unreadable default, 60 s, not a clamped hour that
    # would keep the entry, and /readyz, down for that hour (issue 18).
    assert 0 < seconds <= 60
    assert len(fake_github.apps.statuses("mint")) == 1  # the later ones failed fast


@pytest.mark.parametrize(
    "date", ["Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT", "not a date"]
)
async def test_an_absurd_date_header_is_ignored(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, date: str
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.extra_headers["Date"] = date
    await clone(git, proxy, "acme/private", "out")
    soonest = value(await scrape(proxy), "git_token_proxy_token_soonest_expiry_seconds")
    assert 0 < soonest <= MAX_TOKEN_LIFETIME  # a 1970 Date once made a token look alive for 1.8e9 s


async def test_a_date_far_in_the_past_cannot_stretch_a_token_past_githubs_maximum(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.token_lifetime = 30 * 86400.0  # expires_at a month ahead, whatever GitHub's rules are
    fake_github.apps.extra_headers["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
    [(status, text)] = await info_refs(proxy, "acme/private")
    assert status == 502 and "expires_at" in text  # not within a day of this clock: refused, not believed


# ------------------------------------------------------------ messages


async def test_api_error_messages_reach_git_clean_redacted_and_bounded(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    message = (
        f"\x1b[31mThe permissions requested are not granted\x1b[0m\nremote: forged line\r\n"
        f"JWT {JWT_SHAPED} token ghs_{'a' * 36} {'x' * 5000}"
    )
    fake_github.apps.script_next("mint", CannedAnswer.error(422, message))
    failed = await refused_clone(git, proxy, "acme/private")
    reason = next(line for line in failed.splitlines() if "GitHub refused to mint" in line)
    assert "The permissions requested are not granted remote: forged line JWT <jwt redacted>" in reason
    assert "\x1b" not in failed and "forged" not in failed.replace(reason, "")  # no line of its own
    assert JWT_SHAPED[:30] not in failed and "a" * 36 not in failed
    assert len(reason) < 450


async def test_a_ten_megabyte_message_is_not_read(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.script_next("mint", CannedAnswer.error(422, "y" * 10_000_000))
    [(status, text)] = await info_refs(proxy, "acme/private")
    assert status == 502 and len(text) < 300 and "over 1024 KiB, not read" in text


# ------------------------------------------------------------ storms


async def test_an_upstream_that_rejects_every_token_costs_a_handful_of_mints(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "before")
    fake_github.reject_all_tokens = True
    for i in range(40):
        failed = await refused_clone(git, proxy, "acme/private", f"refused-{i}")
    assert len(fake_github.apps.minted_tokens) <= 3  # one heal, then a pause; not one mint per clone
    assert "rejected a freshly minted token of 'acme-app' too; no new token for" in failed
    fake_github.reject_all_tokens = False
    await clone(git, proxy, "acme/private", "after")  # the token that was kept still works


async def test_one_repo_that_rejects_tokens_does_not_keep_replacing_everyone_elses(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.tokens_rejected_on.add("acme/other")
    for i in range(10):
        await refused_clone(git, proxy, "acme/other", f"refused-{i}")
        await clone(git, proxy, "acme/private", f"fine-{i}")
    assert len(fake_github.apps.minted_tokens) <= 2  # the first token, and one heal
    tokens_on_private = {seen.token for seen in fake_github.git_requests if "/acme/private" in seen.path}
    assert len(tokens_on_private) <= 2


async def test_300_repo_names_under_one_owner_cost_one_installation_look_up(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    answers = [answer for i in range(30) for answer in await info_refs(proxy, f"acme/random-{i:03}", 10, 10)]
    assert len(answers) == 300 and statuses(answers) == {404}
    assert fake_github.apps.statuses("lookup") == [200]  # per owner: one call for the lot
    assert len(fake_github.apps.minted_tokens) == 1


async def test_an_installation_on_a_user_account_is_found_on_users(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.apps.add_installation(acme_app.app, "octo", account_type="User")
    fake_github.create_repo("octo/tool", {"name.txt": b"tool"})
    proxy = await start_proxy(app_config(fake_github.url, acme_app, urlPattern=r"(?<baseUrl>github\.com)/.*"))
    await clone(git, proxy, "octo/tool", "out")
    assert [call.path for call in fake_github.apps.calls if call.path.endswith("/installation")] == [
        "/orgs/octo/installation",
        "/users/octo/installation",
    ]
    assert fake_github.apps.statuses("lookup") == [404, 200]


# ------------------------------------------------------------ dead tokens answered with 404


async def test_a_revoked_token_is_healed_through_githubs_404(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.dead_tokens_get_404 = True  # github.com's answer to a dead token on a private repo
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "before")
    fake_github.apps.revoke_all_tokens()
    await clone(git, proxy, "acme/private", "after")  # git never notices
    assert len(fake_github.apps.minted_tokens) == 2
    assert fake_github.apps.statuses("rate_limit") == [401]  # one liveness check, with the dead token
    samples = await scrape(proxy)
    assert value(samples, "git_token_proxy_token_heals_total", entry="acme-app") == 1
    assert value(samples, "git_token_proxy_token_liveness_checks_total", entry="acme-app", result="dead") == 1


async def test_missing_repos_cost_no_mint_and_almost_no_liveness_checks(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.dead_tokens_get_404 = True
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "warm")
    answers = [answer for i in range(20) for answer in await info_refs(proxy, f"acme/missing-{i}")]
    assert statuses(answers) == {404}  # GitHub's own answer, passed on
    assert len(fake_github.apps.minted_tokens) == 1
    assert 1 <= len(fake_github.apps.statuses("rate_limit")) <= 3
    assert set(fake_github.apps.statuses("rate_limit")) == {200}
    alive = value(await scrape(proxy), "git_token_proxy_token_liveness_checks_total", entry="acme-app", result="alive")
    assert alive == len(fake_github.apps.statuses("rate_limit"))


# ------------------------------------------------------------ through `serve`: reloads and key rotation


async def reload(proxy: ServeProcess) -> None:
    count = proxy.stderr.count("configuration reloaded")
    await proxy.signal(signal.SIGHUP)
    await proxy.wait_for(lambda: proxy.stderr.count("configuration reloaded") > count, "the reload")


async def test_retry_after_inf_then_a_reload_and_the_next_clone_works(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Callable[..., Any]
) -> None:
    proxy = await serve_process(app_config(fake_github.url, acme_app))
    fake_github.apps.script_next("mint", CannedAnswer.error(429, "secondary rate limit", {"Retry-After": "inf"}))
    assert "(in 60 s)" in await refused_clone(git, proxy.url, "acme/private", "limited")
    await reload(proxy)  # a reload forgets the rate-limit window
    await clone(git, proxy.url, "acme/private", "after")
    assert await proxy.stop() == 0


async def test_a_rotated_key_mints_a_new_token_even_with_a_fixed_installation(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Callable[..., Any]
) -> None:
    proxy = await serve_process(app_config(fake_github.url, acme_app, installationId=acme_app.installation.id))
    await clone(git, proxy.url, "acme/private", "before")
    new_key = generate_app_key()
    acme_app.app.public_key = new_key.public_key()  # the old key is deleted on GitHub's side
    acme_app.key_file.write_text(pkcs1_pem(new_key))
    await reload(proxy)
    await clone(git, proxy.url, "acme/private", "after")
    assert len(fake_github.apps.minted_tokens) == 2  # the old key's token was not reused
    jwt.decode(
        fake_github.apps.jwts_seen[-1], new_key.public_key(), algorithms=["RS256"], options={"verify_iat": False}
    )
    assert await proxy.stop() == 0


# ------------------------------------------------------------ found by the second red team


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 O\x1b[31mk\r\nContent-Length: 2\r\n\r\nok", 200),  # the reason phrase is not passed on
        (b"HTTP/1.1 200 OK\r\nX-Debug: a\x01b\x7f\r\nContent-Length: 2\r\n\r\nok", 502),  # a header cannot be
    ],
    ids=["reason-phrase", "header-value"],
)
async def test_control_characters_from_upstream_are_never_a_500(
    raw: bytes, expected: int, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support import static_config

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(raw)
            await writer.drain()
            await asyncio.sleep(0.2)
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    try:
        proxy = await start_proxy(static_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"))
        [(status, text)] = await info_refs(proxy, "acme/private")
    finally:
        server.close()
        await server.wait_closed()
    assert status == expected, text
    assert "\x1b" not in text and "\x01" not in text
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_mint_answered_200_instead_of_201_pauses_like_a_malformed_one(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    """Each such answer may carry a token GitHub made and the proxy lost: not one more per request."""
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    token = {"token": "ghs_" + "a" * 36, "expires_at": "2099-01-01T00:00:00Z", "permissions": {}}
    fake_github.apps.script_next("mint", *[CannedAnswer.json(200, token) for _ in range(10)])
    answers = await info_refs(proxy, "acme/private", times=10)
    assert statuses(answers) == {502}
    assert len(fake_github.apps.statuses("mint")) == 1


async def test_tokens_that_expire_in_seconds_do_not_cause_a_mint_storm(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.token_lifetime = 2.0  # a broken GitHub: every token expires 2 s after it is made
    answers = []
    for _ in range(60):  # one client, one request after another, for about 6 s
        answers += await info_refs(proxy, "acme/private")
        await asyncio.sleep(0.1)
    assert len(fake_github.apps.minted_tokens) <= 3  # at most 3 a minute per token, not one per second
    assert statuses(answers) <= {200, 503}
    assert any("do GitHub's tokens expire that soon?" in text for _, text in answers)


async def test_reloads_that_change_nothing_do_not_reopen_the_heal_storm(
    fake_github: FakeGitHub, acme_app: AcmeApp
) -> None:
    from aiohttp import web

    from proxy.app import PROXY, create_app
    from proxy.config import parse_config

    config = app_config(fake_github.url, acme_app)
    app = await create_app(parse_config(config))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await info_refs(url, "acme/private")
        fake_github.reject_all_tokens = True
        for _ in range(20):  # --watch on a Secret rewritten every few seconds, or SIGHUP in a loop
            await app[PROXY].reload(parse_config(config))
            await info_refs(url, "acme/private")
        assert len(fake_github.apps.minted_tokens) <= 4
    finally:
        await runner.cleanup()
