"""Property test: whatever GitHub's API answers (statuses, headers, bodies), the credential source raises nothing but
its own CredentialError types, with a short clean message, and no request costs more than one mint.

The answers are served by the fake GitHub (`FakeAppApi.script_next`) to the real API client, over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import GitHubAppEntry, parse_config
from proxy.credentials import Credential
from proxy.credentials.cache import TokenCache
from proxy.credentials.github_api import GitHubAppApi
from proxy.credentials.github_app import GitHubAppSource
from proxy.credentials.keys import AppKey, load_app_key
from proxy.errors import CredentialError
from proxy.metrics import Metrics
from proxy.routing import RepoRef
from proxy.testing import CannedAnswer, FakeGitHub, generate_app_key, pkcs1_pem

T = TypeVar("T")
REPO = RepoRef("github.com", "acme", "private")
MESSAGE_BOUND = 500  # our words around GitHub's (at most 300 characters)
JWT_SHAPED = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJJdjIzbGkxMjM0In0.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"


@dataclass
class World:
    fake: FakeGitHub
    entry: GitHubAppEntry
    key: AppKey
    session: aiohttp.ClientSession
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def source(self) -> GitHubAppSource:
        """A fresh source per example: no rate-limit window or pause carries over from the one before."""
        api = GitHubAppApi(
            entry_id=self.entry.id, api_url=self.fake.url, issuer=self.entry.issuer, key=self.key,
            session=self.session, timeout=1.0,  # short: a rate limit is failed fast rather than sat out
        )  # fmt: skip
        tokens = TokenCache(max_entries=100, max_age=3000, refresh_before=300)
        return GitHubAppSource(self.entry, api, tokens, 100, Metrics())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The fake GitHub and the API session on their own event loop thread, so that hypothesis can drive them."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    root = Path(tmp_path_factory.mktemp("api-fuzz"))
    fake = FakeGitHub(root=root / "github")
    key = generate_app_key()
    app = fake.apps.add_app(key)
    fake.apps.add_installation(app, "acme")
    (root / "key.pem").write_text(pkcs1_pem(key))
    run(fake.start())
    config = parse_config({
        "upstreams": [{"host": "github.com", "url": fake.url}],
        "github": {"appInstallation": {"auth": [
            {"id": "acme-app", "type": "GITHUB_APP_INSTALLATION", "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
             "apiUrl": fake.url, "clientId": app.client_id, "privateKey": str(root / "key.pem")},
        ]}},
    })  # fmt: skip
    entry = config.auth[0]
    assert isinstance(entry, GitHubAppEntry)

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    session = run(open_session())
    yield World(fake, entry, load_app_key(entry.id, str(root / "key.pem")), session, loop)
    run(session.close())
    run(fake.close())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


# ------------------------------------------------------------ strategies

EXTREME_NUMBERS = ["inf", "-inf", "nan", "1e300", "1e20", "-1", "0", "1", "3600", "99999999999999999999", "soon", ""]
DATES = [
    "Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT", "yesterday",
    "Mon, 32 Foo 2024 99:99:99 GMT", "Sat, 01 Jan 2000 00:00:00 +9999",
]  # fmt: skip
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
headers = st.dictionaries(
    st.sampled_from(["Retry-After", "x-ratelimit-remaining", "x-ratelimit-reset", "Date", "Location"]),
    st.one_of(st.sampled_from(EXTREME_NUMBERS + DATES), header_text),
    max_size=4,
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.text(max_size=30), st.just(JWT_SHAPED), st.just("\x1b[31mred\x1b[0m\nforged"),
)  # fmt: skip
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                               inner, max_size=3),
                           max_leaves=10)  # fmt: skip
FIELDS = ["id", "token", "expires_at", "permissions", "repositories", "message", "slug", "rate"]
EXPIRIES = ["2099-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "never", "2024-06-01T12:00:00"]
documents = st.dictionaries(
    st.sampled_from(FIELDS), st.one_of(json_values, st.sampled_from(EXPIRIES), st.just("ghs_" + "a" * 36)), max_size=6
)
messages = st.one_of(
    st.text(max_size=50), st.just("\x1b]0;pwned\x07" + JWT_SHAPED + "\n" * 5), st.just("m" * 2_000_000)
)
STATUSES = [200, 201, 202, 204, 301, 302, 400, 401, 403, 404, 422, 429, 500, 502, 503]


@st.composite
def answers(draw: st.DrawFn) -> CannedAnswer:
    status = draw(st.sampled_from(STATUSES))
    extra = draw(headers)
    kind = draw(st.sampled_from(["document", "error", "raw", "bomb"]))
    if kind == "document":
        return CannedAnswer.json(status, draw(documents), extra)
    if kind == "error":
        return CannedAnswer.error(status, draw(messages), extra)
    if kind == "raw":
        return CannedAnswer(status, draw(st.binary(max_size=200)), extra)
    bomb = CannedAnswer.gzip_bomb(status, size_mib=4)  # inflates past the 1 MiB cap
    return CannedAnswer(bomb.status, bomb.body, {**bomb.headers, **extra})


# ------------------------------------------------------------ the property


def check_error(error: BaseException) -> None:
    assert isinstance(error, CredentialError), f"{type(error).__name__}: {error!r}"
    message = str(error)
    assert len(message) <= MESSAGE_BOUND, message[:200]
    assert message.isprintable(), repr(message[:200])
    assert JWT_SHAPED[:30] not in message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lookups=st.lists(answers(), max_size=3), mints=st.lists(answers(), max_size=3), probe=answers())
def test_any_api_answer_is_one_credential_error_at_most(
    world: World, caplog: pytest.LogCaptureFixture, lookups: list[CannedAnswer], mints: list[CannedAnswer],
    probe: CannedAnswer,
) -> None:  # fmt: skip
    fake, source = world.fake, world.source()
    fake.apps.clear_scripts()
    fake.apps.script_next("lookup", *lookups)
    # A canned 201 is a lost token too; after the canned answers, the fake mints for real.
    fake.apps.script_next("mint", *mints)
    fake.apps.script_next("app", probe)
    fake.apps.script_next("rate_limit", probe)
    caplog.clear()
    mint_calls = len(fake.apps.statuses("mint"))

    credential: Credential | None = None
    try:
        credential = world.run(source.get_credential(REPO))
    except Exception as error:
        check_error(error)
    assert fake.apps.statuses("mint")[mint_calls:].count(201) <= 1  # canned or real: one token per request at most
    if credential is not None:
        assert credential.token and credential.token.isprintable() and " " not in credential.token

    try:
        app = world.run(source.describe_app())
        assert isinstance(app["id"], int) and app["id"] > 0
    except Exception as error:
        check_error(error)
    # The liveness check after a 404 asks /rate_limit (the probe) about the token that is cached, if any.
    cached = Credential("x-access-token", credential.token if credential else "ghs_unknown", "cached")
    assert isinstance(world.run(source.recheck_after_not_found(cached, REPO)), bool)
    assert not any(record.exc_info for record in caplog.records if record.levelno >= logging.WARNING)
