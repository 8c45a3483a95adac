"""Access control, read-only entries and scoped tokens, checked with real git clones and pushes."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.testing import FakeGitHub
from tests.e2e.test_git_through_proxy import commit
from tests.support import AcmeApp, Git, StartProxy, app_config

RUNNER_TOKEN = "runner-a-secret-token-0001"
READER_TOKEN = "reader-secret-token-000002"


def with_clients(config: dict[str, Any]) -> dict[str, Any]:
    config["access"] = {
        "clients": [
            {"name": "runner-a", "token": RUNNER_TOKEN, "repos": [r"github\.com/acme/private"]},
            {"name": "reader", "tokenSha256": hashlib.sha256(READER_TOKEN.encode()).hexdigest(),
             "repos": [r"github\.com/acme/.*"], "readOnly": True},
        ]
    }  # fmt: skip
    return config


def url(proxy: str, repo: str, token: str | None = None) -> str:
    userinfo = f"x:{token}@" if token else ""
    return proxy.replace("http://", f"http://{userinfo}") + f"/github.com/{repo}.git"


async def try_push(git: Git, worktree: Path) -> Any:
    await commit(git, worktree, {"change.txt": b"change\n"}, "change")
    return await git("push", "origin", "main", cwd=worktree, check=False)


async def test_client_with_the_right_token_clones_and_pushes(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(with_clients(app_config(fake_github.url, acme_app)))
    await git("clone", "--quiet", url(proxy, "acme/private", RUNNER_TOKEN), "out")
    assert (await try_push(git, git.workdir / "out")).returncode == 0
    # The client's own credential went no further than the proxy.
    assert all(RUNNER_TOKEN not in str(seen.headers) for seen in fake_github.seen)
    assert all(seen.token in fake_github.apps.minted_tokens for seen in fake_github.git_requests)


async def test_missing_wrong_and_other_repo_clients_are_refused(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(with_clients(app_config(fake_github.url, acme_app)))
    missing = await git("clone", url(proxy, "acme/private"), "missing", check=False)
    assert missing.returncode != 0 and missing.prompted  # the one intended prompt: git asks for the client token
    wrong = await git("clone", url(proxy, "acme/private", "not-the-token-at-all"), "wrong", check=False)
    assert wrong.returncode != 0 and "Authentication failed" in wrong.stderr
    other = await git("clone", url(proxy, "acme/other", RUNNER_TOKEN), "other", check=False)
    assert other.returncode != 0
    assert "remote: client 'runner-a' may not access github.com/acme/other" in other.stderr
    # Nothing reached GitHub but the start-up check of the app's key (one GET /app).
    assert [seen.path for seen in fake_github.seen] == ["/app"] and fake_github.apps.minted_tokens == []


async def test_read_only_client_clones_but_cannot_push(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(with_clients(app_config(fake_github.url, acme_app)))
    await git("clone", "--quiet", url(proxy, "acme/other", READER_TOKEN), "out")
    pushed = await try_push(git, git.workdir / "out")
    assert pushed.returncode != 0 and not pushed.prompted
    assert "remote: client 'reader' is read-only: pushes to github.com/acme/other are refused" in pushed.stderr


async def test_read_only_entry_refuses_push_before_any_mint(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app, readOnly=True))
    worktree = tmp_path / "local"
    await git("init", "--quiet", "--initial-branch=main", str(worktree))
    await git("remote", "add", "origin", f"{proxy}/github.com/acme/private.git", cwd=worktree)
    pushed = await try_push(git, worktree)
    assert pushed.returncode != 0 and not pushed.prompted
    assert "remote: auth entry 'acme-app' is read-only: pushes to github.com/acme/private are refused" in pushed.stderr
    # Refused before a token was even looked for: the API saw only the start-up check of the key.
    assert [call.path for call in fake_github.apps.calls] == ["/app"]
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "clone")
    assert fake_github.apps.mint_requests == [{"permissions": {"contents": "read"}}]  # readOnly asks for less


async def test_permissions_and_repository_scope_reach_the_mint_and_bind_the_token(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    config = app_config(fake_github.url, acme_app, permissions={"contents": "read"}, scopeToRepository=True)
    proxy = await start_proxy(config)
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "private")
    await git("clone", "--quiet", f"{proxy}/github.com/acme/other", "other")
    assert fake_github.apps.mint_requests == [
        {"permissions": {"contents": "read"}, "repositories": ["private"]},
        {"permissions": {"contents": "read"}, "repositories": ["other"]},
    ]
    private_token, _ = fake_github.apps.minted_tokens
    assert fake_github.grants[private_token].repos == frozenset({"acme/private"})
    # The fake enforces the scope on its git endpoints: the read-only token cannot push.
    pushed = await try_push(git, git.workdir / "private")
    assert pushed.returncode != 0 and not pushed.prompted
    assert "has contents: read; pushing needs contents: write. The entry asks for contents: read" in pushed.stderr


async def test_permission_not_granted_is_a_readable_error(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app, permissions={"administration": "write"}))
    failed = await git("clone", f"{proxy}/github.com/acme/private", "out", check=False)
    assert failed.returncode != 0 and not failed.prompted
    assert "remote: GitHub refused to mint a token for 'acme-app': The permissions requested are not granted" in (
        failed.stderr
    )


async def test_slow_client_is_cut_off_while_others_are_served(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    config = app_config(fake_github.url, acme_app)
    config["server"] = {"headerTimeout": "1s"}
    proxy = await start_proxy(config)
    host, port = proxy.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def dribble() -> float:
        started = asyncio.get_running_loop().time()
        for byte in b"GET /github.com/acme/private.git/info/refs?service=git-upload-pack HTTP/1.1\r\nX-Slow: ":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
            if reader.at_eof() or writer.is_closing():
                break
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without an answer
        return asyncio.get_running_loop().time() - started

    cut_after, _ = await asyncio.gather(dribble(), git("clone", "--quiet", f"{proxy}/github.com/acme/private", "out"))
    writer.close()
    assert cut_after < 5  # cut at the header timeout, long before the dribble would have finished
    assert (git.workdir / "out" / "name.txt").read_text() == "private"


async def test_audit_lines_are_json_with_the_fields(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(with_clients(app_config(fake_github.url, acme_app)))
    await git("clone", "--quiet", url(proxy, "acme/private", RUNNER_TOKEN), "out")
    await git("clone", url(proxy, "acme/other", RUNNER_TOKEN), "refused", check=False)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "git_token_proxy.audit"]
    served = [line for line in lines if line["status"] == 200]
    assert served and all(line["client"] == "runner-a" for line in served)
    first = served[0]
    for field in ("host", "repo", "service", "bytes_in", "bytes_out", "duration_ms", "entry", "token"):
        assert first[field] is not None, field
    assert (first["host"], first["repo"], first["entry"]) == ("github.com", "acme/private", "acme-app")
    assert {line["token"] for line in served} == {"minted", "cached"}
    token = fake_github.apps.minted_tokens[0]
    assert {line["token_sha256"] for line in served} == {hashlib.sha256(token.encode()).hexdigest()[:8]}
    assert any(line["bytes_in"] > 0 for line in served) and any(line["bytes_out"] > 0 for line in served)
    refused = [line for line in lines if line["status"] == 403]
    assert refused and "may not access" in refused[0]["reason"]


async def test_a_push_refused_for_want_of_contents_write_says_what_to_grant(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    """Issue 19, item 7: GitHub says only `Permission to acme/private denied`; the proxy knows the token it
    minted holds contents: read, and says so, with where to grant contents: write."""
    fake_github.apps.installations.clear()
    fake_github.apps.add_installation(acme_app.app, "acme", permissions={"contents": "read", "metadata": "read"})
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    await git("clone", "--quiet", url(proxy, "acme/private"), "out")
    pushed = await try_push(git, git.workdir / "out")
    assert pushed.returncode != 0 and not pushed.prompted
    assert (
        "remote: the token of auth entry 'acme-app' for acme/private has contents: read; pushing needs contents: "
        "write. Grant it in the GitHub App's settings (Permissions, Contents: Read and write)"
    ) in pushed.stderr
