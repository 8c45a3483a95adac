"""Access control and read-only rules, unit by unit, plus the reload rules that protect them."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.access import AccessControl
from proxy.app import PROXY, create_app
from proxy.config import ConfigError, parse_config
from proxy.errors import AuthenticationRequired, ClientForbidden
from proxy.routing import Router
from proxy.testing import FakeGitHub
from tests.support import AcmeApp, StartProxy, app_config

TOKEN = "a-long-client-token-0001"


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"x:{password}".encode()).decode()


def access_and_router(*patterns: str, read_only: bool = False) -> tuple[AccessControl, Router]:
    config = parse_config(
        {"access": {"clients": [{"name": "ci", "token": TOKEN, "repos": list(patterns), "readOnly": read_only}]}}
    )
    return AccessControl(config.access.clients), Router(config.upstreams, config.auth)


@pytest.mark.parametrize(
    ("pattern", "repo", "allowed"),
    [
        (r"github\.com/acme/private", "acme/private", True),
        (r"github\.com/acme/private", "acme/private-other", False),
        (r"github\.com/acme", "acme/anything", True),
        (r"github\.com/acme", "acme-evil/x", False),
        (r"github\.com/acme/.*", "acme/x", True),
        (r"github\.com/(acme|octo)/tools", "octo/tools", True),
        (r"GitHub\.com/ACME/x", "acme/X", True),
    ],
)
async def test_client_patterns_end_at_a_segment_boundary(pattern: str, repo: str, allowed: bool) -> None:
    access, router = access_and_router(pattern)
    client = await access.authenticate(basic(TOKEN))
    route = router.resolve_route("GET", f"/github.com/{repo}/info/refs", "service=git-upload-pack")
    if allowed:
        access.authorize(client, route)
    else:
        with pytest.raises(ClientForbidden):
            access.authorize(client, route)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer " + TOKEN, basic("wrong-token-value-000"), "Basic !!!", basic("")]
)
async def test_anything_but_the_right_token_is_a_401(header: str | None) -> None:
    access, _ = access_and_router(r"github\.com/.*")
    with pytest.raises(AuthenticationRequired):
        await access.authenticate(header)


async def test_unauthenticated_clients_learn_nothing_about_routes(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    config = app_config(fake_github.url, acme_app)
    config["access"] = {"clients": [{"name": "ci", "token": TOKEN, "repos": [r"github\.com/acme/.*"]}]}
    proxy = await start_proxy(config)
    async with aiohttp.ClientSession() as session:
        for path in ("/evil.example/a/b/info/refs", "/github.com/nobody/x/info/refs", "/github.com/acme/private/HEAD"):
            async with session.get(proxy + path + "?service=git-upload-pack") as response:
                assert response.status == 401  # the same answer whether the host, repo or endpoint exists
                assert response.headers["WWW-Authenticate"] == 'Basic realm="git-token-proxy"'


async def test_read_only_client_may_download_lfs_objects_but_not_upload(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    config = app_config(fake_github.url, acme_app)
    config["access"] = {"clients": [{"name": "ci", "token": TOKEN, "repos": [r"github\.com/acme"], "readOnly": True}]}
    proxy = await start_proxy(config)
    batch = f"{proxy}/github.com/acme/private.git/info/lfs/objects/batch"
    headers = {"Authorization": basic(TOKEN), "Content-Type": "application/vnd.git-lfs+json"}
    objects = [{"oid": "a" * 64, "size": 12}]
    async with aiohttp.ClientSession() as session:
        body = {"operation": "upload", "objects": objects}
        async with session.post(batch, json=body, headers=headers) as upload:
            assert upload.status == 403 and "only LFS downloads" in await upload.text()
        body = {"operation": "download", "objects": objects}
        async with session.post(batch, json=body, headers=headers) as download:
            assert download.status == 200
            assert (await download.json())["objects"][0]["oid"] == "a" * 64  # the buffered body went through whole
    assert [seen.path.endswith("batch") for seen in fake_github.git_requests] == [True]


def test_read_only_with_empty_permissions_still_asks_for_read_only_tokens(acme_app: AcmeApp) -> None:
    config = parse_config(app_config("http://127.0.0.1:1", acme_app, readOnly=True, permissions={}))
    assert config.auth[0].token_permissions == {"contents": "read"}  # type: ignore[union-attr]


async def test_a_reload_cannot_drop_access_control_from_a_public_bind(acme_app: AcmeApp) -> None:
    public: dict[str, Any] = app_config("http://127.0.0.1:1", acme_app)
    public["server"] = {"host": "0.0.0.0"}
    public["access"] = {"clients": [{"name": "ci", "token": TOKEN, "repos": [r"github\.com/.*"]}]}
    app = await create_app(parse_config(public))
    proxy = app[PROXY]
    proxy.bound_host = "0.0.0.0"
    try:
        without_clients = app_config("http://127.0.0.1:1", acme_app)  # server.host back to the loopback default
        with pytest.raises(ConfigError, match=r"not a loopback address and access control is off"):
            await proxy.reload(parse_config(without_clients))
        assert proxy.live.current.access.enabled
    finally:
        await proxy.close()


async def test_a_reload_rebuilds_a_source_whose_api_url_changed(acme_app: AcmeApp, tmp_path: Path) -> None:
    def ghes(url: str) -> dict[str, Any]:
        config = app_config(url, acme_app, apiUrl=None, urlPattern=r"(?<baseUrl>ghe\.corp)/acme/.*")
        config["upstreams"] = [{"host": "ghe.corp", "url": url}]
        return config

    app = await create_app(parse_config(ghes("http://127.0.0.1:1")))
    proxy = app[PROXY]
    try:
        before = proxy.live.current.sources["acme-app"]
        await proxy.reload(parse_config(ghes("http://127.0.0.1:1")))
        assert proxy.live.current.sources["acme-app"] is before  # nothing changed: kept with its caches
        await proxy.reload(parse_config(ghes("http://127.0.0.1:2")))
        after = proxy.live.current.sources["acme-app"]
        assert after is not before and "http://127.0.0.1:2/api/v3" in str(after.identity)
    finally:
        await proxy.close()


async def test_access_rules_see_the_base_url_path_that_routing_matched() -> None:
    """A client allowed `git.company.local/acme/app` must not get team-b's token through
    `/git.company.local/team-b/acme/app`, whose entry's baseUrl is `git.company.local/team-b`."""
    config = parse_config(
        {
            "upstreams": [{"host": "git.company.local"}],
            "access": {"clients": [{"name": "ci", "token": TOKEN, "repos": [r"git\.company\.local/acme/app"]}]},
            "github": {"appInstallation": {"auth": [
                {"id": "team-b", "type": "OAUTH_TOKEN", "token": "team-b-token-0000",
                 "urlPattern": r"(?<baseUrl>git\.company\.local/team-b)/.*"},
                {"id": "company", "type": "OAUTH_TOKEN", "token": "company-token-000",
                 "urlPattern": r"(?<baseUrl>git\.company\.local)/.*"},
            ]}},
        }
    )  # fmt: skip
    access, router = AccessControl(config.access.clients), Router(config.upstreams, config.auth)
    client = await access.authenticate(basic(TOKEN))
    team_b = router.resolve_route("GET", "/git.company.local/team-b/acme/app/info/refs", "service=git-upload-pack")
    assert team_b.entry is not None and team_b.entry.id == "team-b"
    with pytest.raises(ClientForbidden, match="team-b/acme/app"):
        access.authorize(client, team_b)
    own = router.resolve_route("GET", "/git.company.local/acme/app.git/info/refs", "service=git-upload-pack")
    access.authorize(client, own)


async def test_a_reload_that_fails_stops_fetching_the_keys_of_the_issuer_it_would_have_added(
    acme_app: AcmeApp, tmp_path: Path
) -> None:
    from proxy.testing.issuer import JwksMode, TestIssuer

    async with TestIssuer() as issuer:
        issuer.mode = JwksMode.HANGING  # the new issuer's first fetch is still in flight when the reload fails
        app = await create_app(parse_config(app_config("http://127.0.0.1:1", acme_app)))
        proxy = app[PROXY]
        try:
            broken_key = tmp_path / "other.pem"
            broken_key.write_text("-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n")
            config = app_config("http://127.0.0.1:1", acme_app, privateKey=str(broken_key))
            config["access"] = {"issuers": [{
                "name": "orchestrator", "issuer": issuer.url, "audience": "git-token-proxy",
                "jwksUrl": issuer.jwks_url, "repos": [r"github\.com/.*"],
            }]}  # fmt: skip
            with pytest.raises(ConfigError):
                await proxy.reload(parse_config(config))
            assert not proxy.live.current.access.enabled  # the running config stays
            issuer.release_hanging()
            await asyncio.sleep(0.2)
            assert issuer.jwks_fetches <= 1  # a fetch cancelled in flight at most, and nothing fetches again
            assert not any(task.get_name().startswith("jwks") for task in asyncio.all_tasks())
        finally:
            await proxy.close()
