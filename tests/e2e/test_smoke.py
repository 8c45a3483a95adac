from pathlib import Path

from proxy.testing import FakeGitHub
from tests.conftest import Git, StartProxy, static_config


async def test_clone(fake_github: FakeGitHub, private_repo: str, start_proxy: StartProxy, git: Git, tmp_path: Path) -> None:
    proxy = await start_proxy(static_config(fake_github.url))
    await git("clone", f"{proxy}/github.com/{private_repo}.git", "out")
    assert (git.workdir / "out" / "README.md").read_bytes() == b"# private\n"
