"""Signed identities end to end: a sandbox proves who it is with a JWT from a trusted issuer, through git's
credential helper reading a token file, and the proxy keeps the GitHub token to itself."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.testing import FakeGitHub
from proxy.testing.gitcli import PROMPT_MARKERS
from proxy.testing.issuer import TestIssuer
from tests.support import AcmeApp, Git, StartProxy, app_config


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    async with TestIssuer() as running:
        yield running


def identity_config(fake_github: FakeGitHub, acme_app: AcmeApp, issuer: TestIssuer, **more: Any) -> dict[str, Any]:
    config = app_config(fake_github.url, acme_app)
    config["access"] = {"issuers": [{
        "name": "orchestrator", "issuer": issuer.url, "audience": "git-token-proxy", "jwksUrl": issuer.jwks_url,
        "repos": [r"github\.com/acme/.*"], "push": {"refs": ["refs/heads/agent/{client}/**"]},
        "scopeClaim": "git_token_proxy", **more,
    }]}  # fmt: skip
    return config


class Sandbox:
    """git with the proxy's insteadOf rule and the credential helper reading a token file, as a sandbox has it."""

    def __init__(self, git: Git, proxy: str, token_file: Path) -> None:
        self.git, self.token_file = git, token_file
        git.env.update({
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": f"url.{proxy}/github.com/.insteadOf", "GIT_CONFIG_VALUE_0": "https://github.com/",
            "GIT_CONFIG_KEY_1": f"credential.{proxy}.helper",
            "GIT_CONFIG_VALUE_1": f"!git-token-proxy credential-helper --token-file {token_file}",
        })  # fmt: skip

    def hold(self, token: str) -> None:
        self.token_file.write_text(token)


async def test_a_sandbox_clones_and_pushes_into_its_own_namespace_with_a_signed_token(
    fake_github: FakeGitHub, acme_app: AcmeApp, issuer: TestIssuer, start_proxy: StartProxy, git: Git,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(identity_config(fake_github, acme_app, issuer))
    sandbox = Sandbox(git, proxy, tmp_path / "token")
    token = issuer.mint("run-42")
    sandbox.hold(token)
    await git("clone", "--quiet", "https://github.com/acme/private", "private")
    work = git.workdir / "private"
    (work / "fix.txt").write_text("fix\n")
    await git("add", "fix.txt", cwd=work)
    await git("-c", "user.name=a", "-c", "user.email=a@example.com", "commit", "--quiet", "-m", "fix", cwd=work)
    pushed = await git("push", "origin", "HEAD:refs/heads/agent/run-42/fix", cwd=work, check=False)
    assert pushed.returncode == 0, pushed.stderr
    refused = await git("push", "origin", "HEAD:refs/heads/agent/run-77/fix", cwd=work, check=False)
    assert refused.returncode != 0 and "[remote rejected]" in refused.stderr
    assert "not allowed for 'run-42'" in refused.stderr

    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "git_token_proxy.audit"]
    identities = [line["identity"] for line in audit if "identity" in line]
    assert identities and all(i["issuer"] == "orchestrator" and i["sub"] == "run-42" for i in identities)
    assert all(len(i["token"]) == 8 for i in identities)
    signature = token.rsplit(".", 1)[1]
    assert not any(token in r.getMessage() or signature[:16] in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("trouble", "says"),
    [("expired", "token expired"), ("audience", "audience is not git-token-proxy"),
     ("unknown-kid", "unknown signing key"), ("garbage", "not a well-formed JWT"),
     ("other-repo", "may not access github.com/octo/tool")],
)  # fmt: skip
async def test_a_bad_token_is_one_line_and_never_a_prompt(
    fake_github: FakeGitHub, acme_app: AcmeApp, issuer: TestIssuer, start_proxy: StartProxy, git: Git,
    tmp_path: Path, trouble: str, says: str,
) -> None:  # fmt: skip
    fake_github.create_repo("octo/tool", {"README.md": b"tool\n"})
    proxy = await start_proxy(identity_config(fake_github, acme_app, issuer))
    sandbox = Sandbox(git, proxy, tmp_path / "token")
    tokens = {
        "expired": issuer.mint(extra_claims={"exp": 1_000_000_000, "iat": 999_999_000}),
        "audience": issuer.mint(aud="someone-else"),
        "unknown-kid": issuer.mint(headers={"kid": "k9"}),
        "garbage": "not.a.jwt",
        "other-repo": issuer.mint(),
    }
    sandbox.hold(tokens[trouble])
    repo = "octo/tool" if trouble == "other-repo" else "acme/private"
    done = await git("clone", "--quiet", f"https://github.com/{repo}", "out", check=False)
    assert done.returncode != 0
    assert f"remote: {says}" in done.stderr or says in done.stderr, done.stderr
    assert not any(marker in done.stderr for marker in PROMPT_MARKERS)


async def test_a_revoked_token_is_refused_after_a_reload_and_a_rotated_file_is_used_at_once(
    fake_github: FakeGitHub, acme_app: AcmeApp, issuer: TestIssuer, start_proxy: StartProxy, git: Git,
    tmp_path: Path,
) -> None:  # fmt: skip
    first = issuer.mint("run-1", extra_claims={"jti": "leaked-1"})
    proxy = await start_proxy(identity_config(fake_github, acme_app, issuer) | {})
    sandbox = Sandbox(git, proxy, tmp_path / "token")
    sandbox.hold(first)
    assert (await git("ls-remote", "https://github.com/acme/private", check=False)).returncode == 0
    config = identity_config(fake_github, acme_app, issuer)
    config["access"]["revoked"] = ["leaked-1"]
    revoking = await start_proxy(config)
    sandbox = Sandbox(git, revoking, tmp_path / "token")
    refused = await git("ls-remote", "https://github.com/acme/private", check=False)
    assert refused.returncode != 0 and "token 'leaked-1' is revoked" in refused.stderr
    sandbox.hold(issuer.mint("run-1"))  # the orchestrator writes a new token: the next git call uses it
    assert (await git("ls-remote", "https://github.com/acme/private", check=False)).returncode == 0


def padded_token(issuer: TestIssuer, length: int) -> str:
    """A token of about `length` characters (an issuer that puts many groups in its claims)."""
    bare = issuer.mint()
    token = issuer.mint(extra_claims={"groups": "g" * ((length - len(bare) - 16) * 3 // 4)})  # 16: `,"groups":""`
    assert length - 16 <= len(token) <= length
    return token


async def test_a_token_near_the_limit_is_taken_as_a_basic_password_and_a_larger_one_is_refused_in_words(
    fake_github: FakeGitHub, acme_app: AcmeApp, issuer: TestIssuer, start_proxy: StartProxy, git: Git,
    tmp_path: Path,
) -> None:  # fmt: skip
    proxy = await start_proxy(identity_config(fake_github, acme_app, issuer))
    sandbox = Sandbox(git, proxy, tmp_path / "token")
    sandbox.hold(padded_token(issuer, 8 * 1024 - 32))  # the credential helper sends it with a username
    assert (await git("ls-remote", "https://github.com/acme/private", check=False)).returncode == 0
    sandbox.hold(padded_token(issuer, 12 * 1024 - 256))
    refused = await git("ls-remote", "https://github.com/acme/private", check=False)
    assert refused.returncode != 0 and "remote: token is 11 KiB, over the 8 KiB limit" in refused.stderr
    assert not any(marker in refused.stderr for marker in PROMPT_MARKERS)
