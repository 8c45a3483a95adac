"""Demo: a fake GitHub with a private repo, the proxy in front of it, and a real `git clone` that holds no token."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import create_app
from .config import parse_config
from .testing import FakeGitHub, GitResult, git_env, insteadof_env, run_git

REPO = "acme/private-repo"
FILES = {
    "README.md": b"# acme/private-repo\n\nCloned through git-token-proxy: this client never saw a token.\n",
    "src/main.py": b"print('hello from a private repo')\n",
}


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _show(result: GitResult) -> None:
    for line in (result.stdout + result.stderr).strip().splitlines():
        print(f"    {line}")


async def _start_proxy(config_data: dict[str, Any]) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(await create_app(parse_config(config_data, "demo config")), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="git-token-proxy-demo-") as tmp:
        root = Path(tmp)
        fake = FakeGitHub(root=root / "github")
        runners: list[web.AppRunner] = []
        try:
            return await _run(root, fake, runners)
        finally:
            for runner in runners:
                await runner.cleanup()
            await fake.close()


async def _run(root: Path, fake: FakeGitHub, runners: list[web.AppRunner]) -> int:
    _step(f"Starting a fake GitHub (real `git http-backend`, GitHub's Basic-auth rules) with private repo {REPO}")
    fake.create_repo(REPO, FILES)
    token = f"demo_{secrets.token_hex(16)}"
    fake.add_token(token, repos=[REPO])
    await fake.start()
    print(f"    fake GitHub at {fake.url}; it accepts one token, which only the proxy's config holds")

    config = {
        "upstreams": [{"host": "github.com", "url": fake.url}],
        "github": {
            "appInstallation": {
                "auth": [
                    {"id": "demo-bot", "type": "OAUTH_TOKEN", "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
                     "token": token}
                ]
            }
        },
    }  # fmt: skip
    runner, proxy_url = await _start_proxy(config)
    runners.append(runner)
    _step(f"Starting git-token-proxy at {proxy_url}")
    print("    auth entry 'demo-bot' (OAUTH_TOKEN) for (?<baseUrl>github\\.com)/acme/.*")
    print(f"    upstream github.com -> {fake.url}")

    env = git_env(root / "home")
    _step("Without the proxy, git has no credential and GitHub says no")
    direct = await run_git("ls-remote", f"{fake.url}/{REPO}.git", env=env, cwd=root)
    _show(direct)
    if direct.returncode == 0:
        print("    unexpected: the fake GitHub let an anonymous client in")
        return 1

    _step("The one line of git config a user adds (here as GIT_CONFIG_* variables):")
    print(f'    git config --global url."{proxy_url}/github.com/".insteadOf "https://github.com/"')
    env.update(insteadof_env(proxy_url))

    _step(f"git clone https://github.com/{REPO}")
    seen_before = len(fake.seen)
    clone = await run_git("clone", f"https://github.com/{REPO}", "private-repo", env=env, cwd=root)
    _show(clone)
    if clone.returncode != 0:
        print("    FAILED: the clone through the proxy did not work")
        return 1
    readme = (root / "private-repo" / "README.md").read_text()
    print(f"    README.md: {readme.splitlines()[0]}")

    git_requests = [seen for seen in fake.seen[seen_before:] if seen.is_git]
    with_token = sum(1 for seen in git_requests if seen.authorized)
    _step("What the fake GitHub saw")
    for seen in git_requests:
        flag = "with the proxy's token" if seen.authorized else "WITHOUT credentials"
        print(f"    {seen.method:4} {seen.path}{'?' + seen.query if seen.query else ''}  -> {seen.status}  {flag}")
    print(f"\nResult: cloned {REPO} through the proxy; {with_token} of {len(git_requests)} proxied git requests")
    print("carried the token, and the git client never held it.")
    return 0
