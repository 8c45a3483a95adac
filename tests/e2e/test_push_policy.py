"""Push policies through the real proxy, with the real git CLI against the fake GitHub's `git http-backend`: what a
policy allows lands; what it refuses is git's own `[remote rejected]`, and upstream never sees the push."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import subprocess
from typing import Any

import pytest

from proxy.testing import FakeGitHub
from tests.support import AcmeApp, Git, StartProxy, app_config
from tests.test_forward import raw_request

CLIENT_TOKEN = "token-of-run-42-0001"
OTHER_TOKEN = "token-of-run-77-0001"
AGENT_REFS = "refs/heads/agent/{client}/**"


def policy_config(fake_github: FakeGitHub, acme_app: AcmeApp, **push: Any) -> dict[str, Any]:
    """One app entry; two sandboxes, each allowed its own namespace only."""
    config = app_config(fake_github.url, acme_app)
    rules = {"refs": [AGENT_REFS], **push}
    config["access"] = {"clients": [
        {"name": "run-42", "token": CLIENT_TOKEN, "repos": [".*"], "push": rules},
        {"name": "run-77", "token": OTHER_TOKEN, "repos": [".*"], "push": rules},
    ]}  # fmt: skip
    return config


class Sandbox:
    """A clone through the proxy with the client's token in the URL, as a sandbox would have it."""

    def __init__(self, git: Git, proxy: str, token: str = CLIENT_TOKEN) -> None:
        self.git, self.url = git, proxy.replace("http://", f"http://x:{token}@") + "/github.com/acme/private"
        self.work = git.workdir / "private"

    async def clone(self) -> None:
        await self.git("clone", "--quiet", self.url, "private")
        for key, value in (("user.email", "agent@example.com"), ("user.name", "agent")):
            await self.git("config", key, value, cwd=self.work)

    async def commit(self, name: str) -> str:
        (self.work / name).write_text(f"{name}\n")
        await self.git("add", name, cwd=self.work)
        await self.git("commit", "--quiet", "-m", name, cwd=self.work)
        return (await self.git("rev-parse", "HEAD", cwd=self.work)).stdout.strip()

    async def push(self, *args: str) -> subprocess.CompletedProcess[str] | Any:
        return await self.git("push", "--porcelain", self.url, *args, cwd=self.work, check=False)


def receive_packs(fake: FakeGitHub) -> int:
    return sum(1 for seen in fake.seen if seen.method == "POST" and seen.path.endswith("/git-receive-pack"))


@pytest.fixture
async def sandbox(fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git) -> Sandbox:
    proxy = await start_proxy(policy_config(fake_github, acme_app))
    box = Sandbox(git, proxy)
    await box.clone()
    return box


async def test_a_push_into_the_clients_own_namespace_lands(fake_github: FakeGitHub, sandbox: Sandbox) -> None:
    commit = await sandbox.commit("work.txt")
    done = await sandbox.push("HEAD:refs/heads/agent/run-42/fix")
    assert done.returncode == 0, done.stderr
    landed = await sandbox.git("rev-parse", "refs/heads/agent/run-42/fix", cwd=fake_github.repo_path("acme/private"))
    assert landed.stdout.strip() == commit


@pytest.mark.parametrize(
    ("refspec", "says"),
    [("HEAD:main", "push to refs/heads/main is not allowed for 'run-42'; allowed: refs/heads/agent/run-42/**"),
     ("HEAD:refs/tags/v1", "refs/tags/v1 is not allowed"),
     ("HEAD:refs/heads/agentx", "refs/heads/agentx is not allowed"),
     ("HEAD:refs/heads/agent/run-77/x", "refs/heads/agent/run-77/x is not allowed"),
     (":main", "refs/heads/main")],
)  # fmt: skip
async def test_refused_pushes_are_remote_rejected_and_never_reach_upstream(
    fake_github: FakeGitHub, sandbox: Sandbox, refspec: str, says: str
) -> None:
    await sandbox.commit("work.txt")
    before = receive_packs(fake_github)
    done = await sandbox.push(refspec)
    assert done.returncode != 0
    assert "[remote rejected]" in done.stdout + done.stderr and says in done.stdout + done.stderr
    assert "Username" not in done.stderr and "RPC failed" not in done.stderr
    assert receive_packs(fake_github) == before, "the push reached upstream"


async def test_one_refused_ref_refuses_the_whole_push(fake_github: FakeGitHub, sandbox: Sandbox) -> None:
    await sandbox.commit("work.txt")
    before = receive_packs(fake_github)
    done = await sandbox.push("HEAD:refs/heads/agent/run-42/ok", "HEAD:main")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "atomic: refs/heads/main is not allowed" in output  # the allowed one is refused with it
    assert receive_packs(fake_github) == before


async def test_a_delete_needs_delete_and_a_force_needs_force(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    strict = Sandbox(git, await start_proxy(policy_config(fake_github, acme_app)))
    await strict.clone()
    await strict.commit("one.txt")
    assert (await strict.push("HEAD:refs/heads/agent/run-42/b")).returncode == 0
    await strict.git("commit", "--quiet", "--amend", "-m", "rewritten", cwd=strict.work)  # a rewrite of b
    forced = await strict.push("--force", "HEAD:refs/heads/agent/run-42/b")
    assert forced.returncode != 0 and "non-fast-forward" in forced.stdout + forced.stderr
    deleted = await strict.push(":refs/heads/agent/run-42/b")
    assert deleted.returncode != 0 and "delet" in deleted.stdout + deleted.stderr

    permissive = Sandbox(git, await start_proxy(policy_config(fake_github, acme_app, force=True, delete=True)))
    permissive.work = strict.work
    assert (await permissive.push("--force", "HEAD:refs/heads/agent/run-42/b")).returncode == 0
    assert (await permissive.push(":refs/heads/agent/run-42/b")).returncode == 0


async def test_fast_forwards_and_rewinds_to_commits_upstream_has_are_decided_right(
    fake_github: FakeGitHub, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Empty packs: the ancestry is upstream's, asked of GitHub's compare API with the entry's token (which the
    audit line of a refused push names too: it was used)."""
    caplog.set_level(logging.INFO, "git_token_proxy.audit")
    first = await sandbox.commit("one.txt")
    second = await sandbox.commit("two.txt")
    assert (
        await sandbox.push(f"{first}:refs/heads/agent/run-42/a", f"{second}:refs/heads/agent/run-42/b")
    ).returncode == 0
    forward = await sandbox.push(f"{second}:refs/heads/agent/run-42/a")  # a fast-forward to a commit GitHub has
    assert forward.returncode == 0, forward.stdout + forward.stderr
    assert len(fake_github.apps.statuses("compare")) >= 1
    rewind = await sandbox.push("--force", f"{first}:refs/heads/agent/run-42/b")  # backwards: a force
    assert rewind.returncode != 0 and "[remote rejected]" in rewind.stdout + rewind.stderr
    refused = [json.loads(r.getMessage()) for r in caplog.records if '"refused:force"' in r.getMessage()]
    assert refused and refused[-1]["token"] in ("minted", "cached") and refused[-1]["token_sha256"]


async def test_force_with_lease_on_a_fast_forward_and_push_options_and_atomic(
    fake_github: FakeGitHub, sandbox: Sandbox
) -> None:
    one = await sandbox.commit("one.txt")
    assert (await sandbox.push("HEAD:refs/heads/agent/run-42/c")).returncode == 0
    await sandbox.commit("two.txt")
    leased = await sandbox.push(f"--force-with-lease=refs/heads/agent/run-42/c:{one}", "HEAD:refs/heads/agent/run-42/c")
    assert leased.returncode == 0, leased.stdout + leased.stderr
    await sandbox.git("config", "receive.advertisePushOptions", "true", cwd=fake_github.repo_path("acme/private"))
    await sandbox.commit("three.txt")
    atomic = await sandbox.push(
        "--atomic", "-o", "ci.skip", "-o", "merge_request.create", "HEAD:refs/heads/agent/run-42/c",
        "HEAD:refs/heads/agent/run-42/d",
    )  # fmt: skip
    assert atomic.returncode == 0, atomic.stdout + atomic.stderr
    refused = await sandbox.push("--atomic", "-o", "ci.skip", "HEAD:refs/heads/agent/run-42/e", "HEAD:main")
    assert refused.returncode != 0 and "[remote rejected]" in refused.stdout + refused.stderr


async def test_the_audit_line_lists_each_ref_with_its_result(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "git_token_proxy.audit")
    head = await sandbox.commit("work.txt")
    await sandbox.push("HEAD:refs/heads/agent/run-42/e")
    await sandbox.push("HEAD:main")
    pushes = [r.getMessage() for r in caplog.records if '"refs":[' in r.getMessage()]
    assert any(f'"ref":"refs/heads/agent/run-42/e","old":"{"0" * 40}","new":"{head}","result":"ok"' in line
               for line in pushes)  # fmt: skip
    assert any('"ref":"refs/heads/main"' in line and '"result":"refused:ref"' in line for line in pushes)


# ---------------------------------------------------------------- hand-built bodies


def pkt(text: bytes) -> bytes:
    return b"%04x" % (len(text) + 4) + text


OLD, NEW = "0" * 40, "1" * 40
ALLOWED = b"refs/heads/agent/run-42/x"


@pytest.mark.parametrize(
    "body",
    [pytest.param(pkt(b"%s %s refs/heads/main\0report-status\n" % (OLD.encode(), NEW.encode())) + b"0000", id="main"),
     pytest.param(b"0001", id="delim"), pytest.param(b"0002", id="response-end"), pytest.param(b"0004", id="empty"),
     pytest.param(b"ffff" + b"a" * 65531, id="over-long"),
     pytest.param(pkt(b"%s %s %s\0report-status\n" % (OLD.encode(), NEW.encode(), ALLOWED))[:-5] + b"\0\0\0\0\n",
                  id="nul"),
     pytest.param(pkt(b"%s %s %s\0report-status\n" % (OLD.encode(), NEW.encode(), ALLOWED)), id="no-flush"),
     pytest.param(b"0fff" + b"x" * 20, id="past-the-body"),
     pytest.param(pkt(b"%s %s %s\0report-status\n" % (OLD.encode(), NEW.encode(), ALLOWED))
                  + pkt(b"%s %s refs/heads/main\n" % (OLD.encode(), NEW.encode())) + b"0000", id="hidden-second")],
)  # fmt: skip
async def test_hand_built_bodies_are_refused_with_nothing_upstream(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "git_token_proxy.audit")
    proxy = await start_proxy(policy_config(fake_github, acme_app))
    before = receive_packs(fake_github)
    headers = {"Authorization": "Basic eDp0b2tlbi1vZi1ydW4tNDItMDAwMQ==",  # x:token-of-run-42-0001
               "Content-Type": "application/x-git-receive-pack-request"}  # fmt: skip
    status, _, answer = await asyncio.wait_for(
        raw_request(proxy, "/github.com/acme/private.git/git-receive-pack", "POST", headers, body), 30
    )
    assert status in (200, 400, 403), answer
    assert b"ok refs/" not in answer and b"unpack ok\nok" not in answer
    assert receive_packs(fake_github) == before
    audit = [json.loads(r.getMessage()) for r in caplog.records if '"service":"receive-pack"' in r.getMessage()]
    assert audit[-1]["bytes_in"] == len(body)  # what was read for the check and drained after, all of it


async def test_a_compressed_receive_pack_body_under_a_policy_is_refused(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(policy_config(fake_github, acme_app))
    body = gzip.compress(pkt(b"%s %s %s\0report-status\n" % (OLD.encode(), NEW.encode(), ALLOWED)) + b"0000")
    headers = {"Authorization": "Basic eDp0b2tlbi1vZi1ydW4tNDItMDAwMQ==", "Content-Encoding": "gzip"}
    status, _, answer = await raw_request(proxy, "/github.com/acme/private.git/git-receive-pack", "POST", headers, body)
    assert status == 400 and b"compressed" in answer
    assert receive_packs(fake_github) == 0


async def test_an_entry_policy_with_client_needs_clients(fake_github: FakeGitHub, acme_app: AcmeApp) -> None:
    from proxy.config import ConfigError, parse_config

    config = app_config(fake_github.url, acme_app, push={"refs": [AGENT_REFS]})
    with pytest.raises(ConfigError, match=r"auth\[0\]\.push\.refs: \{client\} needs access\.clients"):
        parse_config(config)


# ---------------------------------------------------------------- LFS under a policy


def lfs_requests(fake: FakeGitHub) -> list[str]:
    return [seen.path for seen in fake.seen if "/info/lfs/" in seen.path]


@pytest.mark.parametrize(
    ("path", "body", "refused"),
    [("info/lfs/locks", b'{"path": "a.bin", "ref": {"name": "refs/heads/main"}}', True),
     ("info/lfs/locks", b'{"path": "a.bin", "ref": {"name": "refs/heads/agent/run-42/x"}}', False),
     ("info/lfs/locks/verify", b'{"ref": {"name": "refs/heads/release"}}', True),
     ("info/lfs/locks/1/unlock", b'{"ref": {"name": "refs/heads/agent/run-77/x"}}', True),
     ("info/lfs/locks", b'{"path": "a.bin", "ref": {"name": "refs/heads/main", "NAME": "refs/heads/agent/run-42/x"}}',
      True),
     # A lock or unlock that names no ref holds on every branch: outside a policy that allows only some.
     ("info/lfs/locks", b'{"path": "a.bin"}', True),
     ("info/lfs/locks/1/unlock", b'{"force": true}', True),
     ("info/lfs/locks/verify", b'{"limit": 100}', False),
     # Keys a Go server reads as ref / name (it folds case): unreadable here, so refused.
     ("info/lfs/locks", b'{"path": "a.bin", "Ref": {"name": "refs/heads/main"}}', True),
     ("info/lfs/locks", b'{"path": "a.bin", "ref": {"Name": "refs/heads/main"}}', True),
     ("info/lfs/objects/batch", b'{"operation": "upload", "objects": []}', False),
     ("info/lfs/objects/batch", b'{"operation": "download", "objects": []}', False)],
)  # fmt: skip
async def test_lfs_locks_on_refs_outside_the_policy_are_refused(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, path: str, body: bytes, refused: bool
) -> None:
    proxy = await start_proxy(policy_config(fake_github, acme_app))
    headers = {"Authorization": "Basic eDp0b2tlbi1vZi1ydW4tNDItMDAwMQ==",
               "Content-Type": "application/vnd.git-lfs+json", "Accept": "application/vnd.git-lfs+json"}  # fmt: skip
    status, _, answer = await raw_request(proxy, f"/github.com/acme/private.git/{path}", "POST", headers, body)
    if refused:
        assert status == 403 and (b"push policy" in answer or b"not allowed" in answer), answer
        assert lfs_requests(fake_github) == []
    else:
        assert status != 403 and lfs_requests(fake_github), answer


async def test_lfs_locks_without_a_ref_pass_where_every_ref_may_be_pushed(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    """A policy that allows every ref (only deletes are kept back) has nothing to hold a ref-less lock to."""
    proxy = await start_proxy(policy_config(fake_github, acme_app, refs=["refs/**"]))
    headers = {"Authorization": "Basic eDp0b2tlbi1vZi1ydW4tNDItMDAwMQ==",
               "Content-Type": "application/vnd.git-lfs+json"}  # fmt: skip
    status, _, answer = await raw_request(
        proxy, "/github.com/acme/private.git/info/lfs/locks", "POST", headers, b'{"path": "a.bin"}'
    )
    assert status != 403 and lfs_requests(fake_github), answer


async def test_lfs_uploads_need_a_ref_the_party_may_push(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    """The entry allows only release branches, the client only its own namespace: no ref passes both, so the
    party may push nothing, and an upload batch is refused (a download is not)."""
    config = policy_config(fake_github, acme_app)
    config["github"]["appInstallation"]["auth"][0]["push"] = {"refs": ["refs/heads/release/**"]}
    proxy = await start_proxy(config)
    headers = {"Authorization": "Basic eDp0b2tlbi1vZi1ydW4tNDItMDAwMQ==",
               "Content-Type": "application/vnd.git-lfs+json"}  # fmt: skip
    batch = "/github.com/acme/private.git/info/lfs/objects/batch"
    status, _, answer = await raw_request(proxy, batch, "POST", headers, b'{"operation": "upload", "objects": []}')
    assert status == 403 and b"LFS uploads and locks" in answer
    status, _, _ = await raw_request(proxy, batch, "POST", headers, b'{"operation": "download", "objects": []}')
    assert status != 403
