"""GitHub App installation tokens end to end: real git, the proxy's broker, and a fake GitHub with GitHub's rules."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import jwt
import pytest

from proxy.testing import FakeGitHub, openssh_pem, pkcs8_pem
from tests.support import AcmeApp, Git, StartProxy, app_config


async def clone(git: Git, proxy: str, repo: str, dest: str, check: bool = True) -> str:
    result = await git("clone", "--quiet", f"{proxy}/github.com/{repo}.git", dest, check=check)
    if check:
        assert (git.workdir / dest / "name.txt").read_text() == repo.split("/")[1]
    return result.stderr


async def refused_clone(git: Git, proxy: str, repo: str, dest: str = "refused") -> str:
    """A clone that must fail, readably and without a password prompt; returns what git printed."""
    result = await git("clone", f"{proxy}/github.com/{repo}", dest, check=False)
    assert result.returncode != 0 and not result.prompted, result.stderr
    return result.stderr


def counts(fake: FakeGitHub) -> tuple[int, int]:
    return fake.apps.count("lookup"), fake.apps.count("mint")


def minted_tokens_used(fake: FakeGitHub) -> set[str | None]:
    return {seen.token for seen in fake.git_requests}


async def test_one_token_per_installation_shared_by_its_repos(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "one")
    assert counts(fake_github) == (1, 1)  # cold: one look-up, one mint
    await clone(git, proxy, "acme/private", "two")
    assert counts(fake_github) == (1, 1)  # warm: no API call at all
    await clone(git, proxy, "acme/other", "three")
    assert counts(fake_github) == (1, 1)  # same owner, same installation: no look-up, no mint
    assert minted_tokens_used(fake_github) == {fake_github.apps.minted_tokens[0]}
    assert all(seen.authorized for seen in fake_github.git_requests)


async def test_parallel_cold_clones_cause_exactly_one_mint(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.apps.mint_latency = 0.5
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    repos = ["acme/private", "acme/other", "acme/third", "acme/fourth"]
    await asyncio.gather(*(clone(git, proxy, repos[i % 4], f"clone-{i}") for i in range(16)))
    lookups, mints = counts(fake_github)
    assert mints == 1
    assert lookups == 1  # one per owner, also single-flight


async def test_expired_token_is_replaced(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.apps.token_lifetime = 3
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "before")
    await asyncio.sleep(3.2)
    await clone(git, proxy, "acme/private", "after")
    assert counts(fake_github)[1] == 2
    _first, second = fake_github.apps.minted_tokens
    assert {seen.token for seen in fake_github.git_requests[-3:]} == {second}


async def test_revoked_tokens_heal_on_info_refs(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "before")
    fake_github.apps.revoke_all_tokens()
    stderr = await clone(git, proxy, "acme/private", "after")
    assert counts(fake_github)[1] == 2
    assert "401" not in stderr
    rejected = [seen for seen in fake_github.git_requests if seen.status == 401]
    assert len(rejected) == 1 and rejected[0].path.endswith("info/refs")


async def test_one_mint_failure_is_retried_and_never_cached(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.fail_next_mints(1)
    await clone(git, proxy, "acme/private", "retried")  # the broker's retry absorbs one 500
    assert fake_github.apps.statuses("mint") == [500, 201]


async def test_persistent_mint_failure_is_a_503_and_the_next_clone_works(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.fail_next_mints(3, status=502)
    failed = await refused_clone(git, proxy, "acme/private", "failed")
    assert "remote: GitHub API failed for 'acme-app': HTTP 502 after 3 tries" in failed
    await clone(git, proxy, "acme/private", "recovered")  # nothing of the failure was cached
    assert counts(fake_github)[1] == 1


async def test_short_rate_limit_is_waited_out(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.rate_limit_next_mints(1, retry_after=1)
    await clone(git, proxy, "acme/private", "waited")
    assert fake_github.apps.statuses("mint") == [403, 201]


async def test_long_rate_limit_fails_fast_with_a_readable_503(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.rate_limit_next_mints(1, reset_in=1800)
    failed = await refused_clone(git, proxy, "acme/private", "failed")
    assert "remote: GitHub rate limit reached for 'acme-app'; it resets at" in failed
    assert "503" in failed
    assert len(fake_github.apps.statuses("mint")) == 1  # no retry storm


@pytest.mark.parametrize("offset", [300, -300])
async def test_clock_skew_is_learned_from_date(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, offset: int
) -> None:
    fake_github.clock_offset = offset
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "skewed")
    accepted = jwt.decode(fake_github.apps.jwts_seen[-1], options={"verify_signature": False})
    assert accepted["iat"] <= fake_github.now() < accepted["exp"] <= fake_github.now() + 600
    rejected = [c for c in fake_github.apps.calls if c.status == 401]
    # GitHub ahead: the backdated iat and 9-minute exp absorb it. GitHub behind: one 401, then its clock is used.
    assert len(rejected) == (1 if offset < 0 else 0)
    if offset < 0:
        assert abs(accepted["iat"] - (fake_github.now() - 60)) < 5


async def test_jwt_claims_follow_githubs_rules(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "out")
    token = fake_github.apps.jwts_seen[0]
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = jwt.decode(token, acme_app.key.public_key(), algorithms=["RS256"], options={"verify_iat": False})
    assert claims["iss"] == acme_app.app.client_id
    assert claims["exp"] - claims["iat"] == 600
    assert isinstance(claims["iat"], int)


async def test_ghes_api_url_app_id_and_fixed_installation(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    config = app_config(
        fake_github.url, acme_app, apiUrl=f"{fake_github.url}/api/v3", clientId=None,
        appId=acme_app.app.app_id, installationId=acme_app.installation.id,
    )  # fmt: skip
    proxy = await start_proxy(config)
    await clone(git, proxy, "acme/private", "out")
    assert counts(fake_github) == (0, 1)  # installationId given: no look-up
    minted = f"/app/installations/{acme_app.installation.id}/access_tokens"
    assert sorted(c.path for c in fake_github.apps.calls) == ["/app", minted]  # the start-up check, and one mint
    claims = jwt.decode(fake_github.apps.jwts_seen[0], options={"verify_signature": False})
    assert claims["iss"] == str(acme_app.app.app_id)  # a string, as GitHub wants


@pytest.mark.parametrize("form", ["pkcs8", "openssh", "inline-escaped", "crlf-quoted"])
async def test_key_formats(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, tmp_path: Path, form: str
) -> None:
    if form == "pkcs8":
        acme_app.key_file.write_text(pkcs8_pem(acme_app.key))
        value = str(acme_app.key_file)
    elif form == "openssh":
        acme_app.key_file.write_text(openssh_pem(acme_app.key))
        value = str(acme_app.key_file)
    elif form == "inline-escaped":
        value = pkcs8_pem(acme_app.key).replace("\n", "\\n")  # as pasted into one env var
    else:
        value = '"' + pkcs8_pem(acme_app.key).replace("\n", "\r\n") + '"\n'
    proxy = await start_proxy(app_config(fake_github.url, acme_app, privateKey=value))
    await clone(git, proxy, "acme/private", "out")


async def test_concord_secret_file(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    from proxy.testing import pkcs1_pem

    secret = tmp_path / "team-a.json"
    secret.write_text(
        json.dumps({"githubAppInstallation": {
            "apiUrl": fake_github.url, "clientId": acme_app.app.client_id, "privateKey": pkcs1_pem(acme_app.key),
            "urlPattern": "(?<baseUrl>github\\.com)/acme/.*", "username": "x-access-token",
        }})
    )  # fmt: skip
    config = app_config(fake_github.url, acme_app)
    config["github"]["appInstallation"] = {"auth": [], "secretFiles": [str(secret)]}
    proxy = await start_proxy(config)
    await clone(git, proxy, "acme/private", "out")
    assert counts(fake_github) == (1, 1)


async def test_long_stateless_tokens_work(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.apps.long_tokens = True
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "out")
    (token,) = fake_github.apps.minted_tokens
    assert len(token) > 500 and "." in token
    assert minted_tokens_used(fake_github) == {token}


async def test_reinstalled_app_is_looked_up_again(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.apps.token_lifetime = 2  # so the second clone has to mint with the cached (stale) installation id
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "before")
    fake_github.apps.reinstall(acme_app.installation)
    await asyncio.sleep(2.2)
    await clone(git, proxy, "acme/private", "after")
    mint_statuses = fake_github.apps.statuses("mint")
    assert mint_statuses == [201, 404, 201]
    assert counts(fake_github) == (2, 2)


async def test_not_installed_is_a_readable_403(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    config = app_config(fake_github.url, acme_app, urlPattern=r"(?<baseUrl>github\.com)/.*")
    fake_github.create_repo("elsewhere/repo", {"x": b"x"})
    proxy = await start_proxy(config)
    failed = await refused_clone(git, proxy, "elsewhere/repo", "out")
    assert "remote: GitHub App 'acme-app' is not installed on elsewhere/repo (or cannot see it)" in failed
    assert "403" in failed
    await git("clone", f"{proxy}/github.com/elsewhere/repo", "again", check=False)
    assert counts(fake_github)[0] == 0  # the 404 was remembered (5 min): no second look-up call succeeded
    assert fake_github.apps.statuses("lookup") == [404, 404]  # /orgs/elsewhere, then /users/elsewhere, once


async def test_wrong_key_is_a_readable_502(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    from proxy.testing import generate_app_key, pkcs1_pem

    acme_app.key_file.write_text(pkcs1_pem(generate_app_key()))
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    failed = await refused_clone(git, proxy, "acme/private", "out")
    assert "remote: GitHub rejected the JWT for 'acme-app': A JSON web token could not be decoded" in failed
    assert "502" in failed


async def test_rate_limit_resetting_now_is_not_a_busy_loop(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.rate_limit_next_mints(100, reset_in=0)  # x-ratelimit-reset already reached: "wait 0 s"
    failed = await refused_clone(git, proxy, "acme/private", "failed")
    assert "remote: GitHub rate limit reached for 'acme-app'" in failed
    mint_calls = len(fake_github.apps.statuses("mint"))
    assert mint_calls == 3  # three tries, a second apart; not thousands
    await refused_clone(git, proxy, "acme/private", "again")
    assert len(fake_github.apps.statuses("mint")) == mint_calls  # fail fast


async def test_revoked_token_is_evicted_by_a_401_on_a_post(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    """LFS is all POSTs: a POST cannot be replayed, but its 401 still evicts the token for the next request."""
    import aiohttp

    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "out")
    fake_github.apps.revoke_all_tokens()
    batch = f"{proxy}/github.com/acme/private.git/info/lfs/objects/batch"
    body = {"operation": "download", "objects": [{"oid": "a" * 64, "size": 1}]}
    headers = {"Accept": "application/vnd.git-lfs+json", "Content-Type": "application/vnd.git-lfs+json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(batch, json=body, headers=headers) as first:
            assert first.status == 502 and "rejected the credential" in await first.text()
        async with session.post(batch, json=body, headers=headers) as second:
            assert second.status == 200
    assert counts(fake_github)[1] == 2


async def test_a_failed_installation_look_up_is_not_cached(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    fake_github.apps.fail_next_lookups(3, status=503)
    assert "HTTP 503 after 3 tries" in await refused_clone(git, proxy, "acme/private", "failed")
    await clone(git, proxy, "acme/private", "recovered")  # looked up again: the failure left nothing behind
    assert counts(fake_github) == (1, 1)


async def test_repo_installation_tells_a_repo_outside_the_selection_apart(
    fake_github: FakeGitHub, acme_app: AcmeApp
) -> None:
    """For `check --repo`: the owner has an installation, but it may not have selected this repo."""
    from proxy.app import build_api_session, build_credentials
    from proxy.config import parse_config
    from proxy.credentials.github_app import GitHubAppSource
    from proxy.metrics import Metrics
    from proxy.routing import RepoRef

    selected = fake_github.apps.add_installation(acme_app.app, "octo", repos=["octo/tool"])
    config = parse_config(app_config(fake_github.url, acme_app, urlPattern=r"(?<baseUrl>github\.com)/.*"))
    async with build_api_session(config) as session:
        source = (await build_credentials(config, Metrics(), session)).sources["acme-app"]
        assert isinstance(source, GitHubAppSource)
        assert await source.repo_installation(RepoRef("github.com", "octo", "tool")) == selected.id
        assert await source.repo_installation(RepoRef("github.com", "octo", "other")) is None
        assert await source.installation_for(RepoRef("github.com", "octo", "other")) == selected.id  # per owner
    assert [call.path for call in fake_github.apps.calls] == [
        "/repos/octo/tool/installation", "/repos/octo/other/installation", "/orgs/octo/installation",
    ]  # fmt: skip


async def test_a_mint_answer_listing_hundreds_of_full_repositories_works(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    """An installation on 400 selected repositories: GitHub's mint answer lists each as a full repository object,
    over 2 MiB in all (issue 18: past about 180, the answer passed the 1 MiB cap, the token was lost and minting
    paused). It is read with the larger cap of mint answers, and only the fields used are kept."""
    fake_github.apps.installations.clear()
    selected = ["acme/private", *(f"acme/repo-{i:03}" for i in range(399))]
    fake_github.apps.add_installation(acme_app.app, "acme", repos=selected)
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await clone(git, proxy, "acme/private", "out")
    assert counts(fake_github) == (1, 1)


async def test_get_app_without_a_slug_names_the_app_by_its_name(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`slug` is optional in GitHub's `integration` schema: check, and the refusals that name the app, use its name."""
    from proxy.check import run_check
    from proxy.config import parse_config

    acme_app.app.slug = None
    config = app_config(fake_github.url, acme_app, urlPattern=r"(?<baseUrl>github\.com)/.*")
    assert await run_check(parse_config(config), "config.yaml", None) == 0
    assert "GitHub App 'Acme CI'" in capsys.readouterr().out
    proxy = await start_proxy(config)
    assert "is not installed on nobody/x (or cannot see it) (app 'Acme CI')" in await refused_clone(
        git, proxy, "nobody/x"
    )


async def test_a_public_repo_the_app_is_not_installed_on_clones_without_a_token(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    """The quick start's catch-all entry and a public dependency (`torvalds/linux`, a public submodule): the app
    is not installed there, and the read goes upstream without a token, as a direct clone would. A private repo
    of such an owner still gets the proxy's reason, pushes never fall back, and the fallback is not a failure."""
    fake_github.create_repo("torvalds/linux", {"name.txt": b"linux", "README": b"public\n"}, public=True)
    fake_github.create_repo("torvalds/secret", {"name.txt": b"secret"})
    proxy = await start_proxy(app_config(fake_github.url, acme_app, urlPattern=r"(?<baseUrl>github\.com)/.*"))
    await clone(git, proxy, "torvalds/linux", "linux")
    await clone(git, proxy, "acme/private", "private")  # the app's own repos still get its token
    assert "is not installed on torvalds/secret (or cannot see it)" in await refused_clone(
        git, proxy, "torvalds/secret"
    )
    (git.workdir / "linux" / "change.txt").write_text("change\n")
    await git("add", "change.txt", cwd=git.workdir / "linux")
    await git("commit", "--quiet", "-m", "change", cwd=git.workdir / "linux")
    pushed = await git("push", "origin", "HEAD", cwd=git.workdir / "linux", check=False)
    assert pushed.returncode != 0 and not pushed.prompted
    assert "is not installed on torvalds/linux" in pushed.stderr
    anonymous = [seen for seen in fake_github.git_requests if seen.path.startswith("/torvalds/linux")]
    assert anonymous and all(seen.token is None for seen in anonymous)
    assert fake_github.apps.statuses("lookup") == [404, 404, 200]  # torvalds once (remembered), then acme
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/metrics") as response:
        body = await response.text()
    assert 'git_token_proxy_anonymous_fallbacks_total{entry="acme-app"} 3.0' in body  # info/refs, ls-refs, fetch
    # The private repo's refusal and the push's count as failures; the public reads do not.
    assert 'git_token_proxy_token_mint_failures_total{entry="acme-app",reason="not_installed"} 2.0' in body
