"""The real git CLI through the real proxy to a fake GitHub running `git http-backend`, with a static token."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from proxy.testing import FakeGitHub, insteadof_env, run_git_sync
from tests.support import STATIC_TOKEN, Git, StartProxy, static_config


async def commit(git: Git, worktree: Path, files: dict[str, bytes], message: str) -> str:
    for name, content in files.items():
        (worktree / name).parent.mkdir(parents=True, exist_ok=True)
        (worktree / name).write_bytes(content)
    await git("add", "-A", cwd=worktree)
    await git("commit", "--quiet", "-m", message, cwd=worktree)
    return (await git("rev-parse", "HEAD", cwd=worktree)).stdout.strip()


def upstream_head(fake: FakeGitHub, full_name: str, git: Git) -> str:
    return run_git_sync("rev-parse", "main", env=git.env, cwd=fake.repo_path(full_name)).check().stdout.strip()


async def push_directly(git: Git, fake: FakeGitHub, full_name: str, files: dict[str, bytes], tmp: Path) -> str:
    """Change the upstream behind the proxy's back, as another GitHub user would."""
    worktree = tmp / f"direct-{len(os.listdir(tmp))}"
    await git("clone", "--quiet", str(fake.repo_path(full_name)), str(worktree))
    sha = await commit(git, worktree, files, "upstream change")
    await git("push", "--quiet", "origin", "main", cwd=worktree)
    return sha


def assert_every_git_request_carried_the_token(fake: FakeGitHub) -> None:
    requests = fake.git_requests
    assert requests, "the fake saw no git request"
    assert all(seen.token == STATIC_TOKEN for seen in requests), [(s.path, s.username) for s in requests]
    assert all(seen.username == "x-access-token" for seen in requests)


@pytest.mark.parametrize("protocol", ["0", "2"])
async def test_clone_protocol_v0_and_v2(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git, protocol: str
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    await git("-c", f"protocol.version={protocol}", "clone", f"{proxy}/github.com/{private_repo}.git", "out")
    assert (git.workdir / "out" / "src" / "app.py").read_bytes() == b"print('hello')\n"
    assert_every_git_request_carried_the_token(fake_github)
    sent_protocol = {seen.headers.get("Git-Protocol") for seen in fake_github.git_requests}
    assert sent_protocol == ({"version=2"} if protocol == "2" else {None})


async def test_fetch_sees_new_upstream_commits(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    await git("clone", "--quiet", f"{proxy}/github.com/{private_repo}", "out")
    new_sha = await push_directly(git, fake_github, private_repo, {"NEW.md": b"new\n"}, tmp_path)
    await git("fetch", "--quiet", "origin", cwd=git.workdir / "out")
    fetched = await git("rev-parse", "origin/main", cwd=git.workdir / "out")
    assert fetched.stdout.strip() == new_sha
    assert_every_git_request_carried_the_token(fake_github)


async def test_push_through_proxy(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    await git("clone", "--quiet", f"{proxy}/github.com/{private_repo}.git", "out")
    sha = await commit(git, git.workdir / "out", {"pushed.txt": b"pushed through the proxy\n"}, "push test")
    await git("push", "--quiet", "origin", "main", cwd=git.workdir / "out")
    assert upstream_head(fake_github, private_repo, git) == sha
    receive = [seen for seen in fake_github.git_requests if "receive-pack" in seen.path + seen.query]
    assert receive and all(seen.token == STATIC_TOKEN for seen in receive)


async def test_shallow_clone(fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git,
                             tmp_path: Path) -> None:  # fmt: skip
    for i in range(3):
        await push_directly(git, fake_github, private_repo, {f"f{i}.txt": b"x" * i}, tmp_path)
    proxy = await start_proxy(static_config(fake_github.url))
    await git("clone", "--quiet", "--depth", "1", f"{proxy}/github.com/{private_repo}.git", "out")
    count = await git("rev-list", "--count", "HEAD", cwd=git.workdir / "out")
    assert count.stdout.strip() == "1"
    assert (git.workdir / "out" / "f2.txt").exists()


async def test_partial_clone_fetches_blobs_lazily_through_proxy(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    await git("clone", "--quiet", "--filter=blob:none", "--no-checkout", f"{proxy}/github.com/{private_repo}", "out")
    before = len(fake_github.git_requests)
    await git("checkout", "--quiet", "main", cwd=git.workdir / "out")  # missing blobs come through the proxy
    assert (git.workdir / "out" / "README.md").read_bytes() == b"# private\n"
    assert len(fake_github.git_requests) > before
    promisor = await git("config", "remote.origin.promisor", cwd=git.workdir / "out")
    assert promisor.stdout.strip() == "true"
    assert_every_git_request_carried_the_token(fake_github)


def add_tagged_commits_upstream(fake: FakeGitHub, full_name: str, count: int, git: Git) -> None:
    """`count` commits on main upstream, each with its own tag, written with fast-import for speed."""
    bare = fake.repo_path(full_name)
    parent = run_git_sync("rev-parse", "main", env=git.env, cwd=bare).check().stdout.strip()
    script = "".join(
        f"commit refs/heads/main\nmark :{i}\ncommitter T <t@example.com> {1700000000 + i} +0000\ndata 3\nc{i % 10}\n"
        + (f"from {parent}\n" if i == 1 else "")
        + f"M 644 inline tagged/{i}.txt\ndata 2\n{i % 10}\n\nreset refs/tags/t{i}\nfrom :{i}\n\n"
        for i in range(1, count + 1)
    )
    subprocess.run(["git", "fast-import", "--quiet"], input=script.encode(), cwd=bare, env=git.env, check=True)


async def test_gzip_negotiation_reaches_upstream_compressed(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git
) -> None:
    """git gzips upload-pack requests over 1 KiB; the proxy must pass them on byte for byte."""
    proxy = await start_proxy(static_config(fake_github.url))
    out = git.workdir / "out"
    await git("clone", "--quiet", f"{proxy}/github.com/{private_repo}", "out")
    add_tagged_commits_upstream(fake_github, private_repo, 300, git)  # 300 wants: a ~15 KiB request
    await git("fetch", "--quiet", "--tags", "origin", cwd=out)
    assert (await git("rev-parse", "t300", cwd=out)).stdout.strip() == upstream_head(fake_github, private_repo, git)
    assert len((await git("tag", cwd=out)).stdout.split()) == 300
    gzipped = [seen for seen in fake_github.git_requests if seen.content_encoding == "gzip"]
    assert gzipped, "no gzip-encoded negotiation reached the fake"
    assert all(seen.path.endswith("git-upload-pack") and seen.token == STATIC_TOKEN for seen in gzipped)


async def test_push_larger_than_post_buffer_is_chunked(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    out = git.workdir / "out"
    await git("clone", "--quiet", f"{proxy}/github.com/{private_repo}", "out")
    sha = await commit(git, out, {"big.bin": os.urandom(2 * 1024 * 1024)}, "big push")
    await git("-c", "http.postBuffer=65536", "push", "--quiet", "origin", "main", cwd=out)
    assert upstream_head(fake_github, private_repo, git) == sha
    pushes = [seen for seen in fake_github.git_requests if seen.path.endswith("git-receive-pack")]
    assert any(seen.chunked and "Content-Length" not in seen.headers for seen in pushes)


async def test_insteadof_and_submodules(
    fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path
) -> None:
    """The user's recipe: one insteadOf line, and submodules with https://github.com URLs follow it too."""
    fake_github.create_repo("acme/other", {"lib.txt": b"library\n"})
    proxy = await start_proxy(static_config(fake_github.url))
    git.env.update(insteadof_env(proxy))
    worktree = tmp_path / "parent"
    await git("clone", "--quiet", "https://github.com/acme/private", str(worktree))
    await git("-c", "protocol.file.allow=always", "submodule", "add", "--quiet",
              "https://github.com/acme/other", "vendor/other", cwd=worktree)  # fmt: skip
    await git("commit", "--quiet", "-m", "add submodule", cwd=worktree)
    await git("push", "--quiet", "origin", "main", cwd=worktree)
    await git("clone", "--quiet", "--recurse-submodules", "https://github.com/acme/private", "recursive")
    assert (git.workdir / "recursive" / "vendor" / "other" / "lib.txt").read_bytes() == b"library\n"
    assert {seen.path.split("/")[2] for seen in fake_github.git_requests} == {"private", "other"}
    assert_every_git_request_carried_the_token(fake_github)


async def test_public_repo_passes_through_anonymously(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.create_repo("octo/public", {"hello.txt": b"hi\n"}, public=True)
    proxy = await start_proxy(static_config(fake_github.url))
    await git("clone", "--quiet", f"{proxy}/github.com/octo/public", "out")
    assert (git.workdir / "out" / "hello.txt").read_bytes() == b"hi\n"
    assert all(not seen.carried_credentials for seen in fake_github.git_requests)


async def test_anonymous_false_refuses_with_a_readable_message(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.create_repo("octo/public", {"hello.txt": b"hi\n"}, public=True)
    config = static_config(fake_github.url, upstreams=[{"host": "github.com", "url": fake_github.url,
                                                        "anonymous": False}])  # fmt: skip
    proxy = await start_proxy(config)
    result = await git("clone", f"{proxy}/github.com/octo/public", "out", check=False)
    assert result.returncode != 0
    assert "remote: no auth entry matches github.com/octo/public and anonymous access" in result.stderr
    assert not result.prompted
    assert fake_github.seen == []


async def test_private_repo_without_entry_never_prompts(
    fake_github: FakeGitHub, start_proxy: StartProxy, git: Git
) -> None:
    fake_github.create_repo("someone/secret", {"x": b"x"})
    proxy = await start_proxy(static_config(fake_github.url))
    result = await git("clone", f"{proxy}/github.com/someone/secret", "out", check=False)
    assert result.returncode != 0
    assert "remote: github.com/someone/secret needs credentials and no auth entry" in result.stderr
    assert "403" in result.stderr
    assert not result.prompted


async def test_the_fakes_throttle_really_throttles(fake_github: FakeGitHub, git: Git) -> None:
    """`git_bytes_per_second` is what tests use to keep a transfer going: it must hold. Only a lower bound on the
    time is asserted, which a slow or busy machine cannot break."""
    fake_github.create_repo("acme/slow", {"blob.bin": os.urandom(3 * 1024 * 1024)}, public=True)
    fake_github.git_bytes_per_second = 1024 * 1024
    started = time.monotonic()
    await git("clone", "--quiet", f"{fake_github.url}/acme/slow", "slow")
    elapsed = time.monotonic() - started
    assert fake_github.upload_pack_bytes >= 3 * 1024 * 1024
    assert elapsed >= 2.0, f"3 MiB at 1 MiB/s arrived in {elapsed:.1f} s"
