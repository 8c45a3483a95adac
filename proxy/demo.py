"""Demo: a fake GitHub with a GitHub App, the proxy in front of it, and real `git clone`s that hold no token."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from .testing import FakeGitHub, GitResult, generate_app_key, git_env, insteadof_env, pkcs1_pem, run_git
from .testing.harness import start_proxy_app

REPO = "acme/private-repo"
OTHER_REPO = "acme/another-repo"
FILES = {
    "README.md": b"# acme/private-repo\n\nCloned through git-token-proxy: this client never saw a token.\n",
    "src/main.py": b"print('hello from a private repo')\n",
}


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _show(result: GitResult) -> None:
    for line in (result.stdout + result.stderr).strip().splitlines():
        print(f"    {line}")


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
    _step(f"Starting a fake GitHub (real `git http-backend`, GitHub's App API and auth rules) with private repo {REPO}")
    fake.create_repo(REPO, FILES)
    fake.create_repo(OTHER_REPO, {"README.md": b"# acme/another-repo\n"})
    key = generate_app_key()
    key_file = root / "acme-app.pem"
    key_file.write_text(pkcs1_pem(key))
    key_file.chmod(0o600)
    app = fake.apps.add_app(key, slug="acme-ci")
    installation = fake.apps.add_installation(app, "acme")
    await fake.start()
    print(f"    fake GitHub at {fake.url}")
    print(f"    GitHub App 'acme-ci' (client id {app.client_id}), installation {installation.id} on the acme org")
    print(f"    its private key (generated just now) is in {key_file}; only the proxy reads it")

    config = {
        "upstreams": [{"host": "github.com", "url": fake.url}],
        "github": {
            "appInstallation": {
                "auth": [
                    {"id": "acme-ci", "type": "GITHUB_APP_INSTALLATION",
                     "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
                     "apiUrl": fake.url, "clientId": app.client_id, "privateKey": str(key_file)}
                ]
            }
        },
    }  # fmt: skip
    runner, proxy_url = await start_proxy_app(config)
    runners.append(runner)
    _step(f"Starting git-token-proxy at {proxy_url}")
    print("    auth entry 'acme-ci' (GITHUB_APP_INSTALLATION) for (?<baseUrl>github\\.com)/acme/.*")
    print(f"    upstream github.com -> {fake.url}; GitHub API -> {fake.url}")

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

    seen_before = len(fake.seen)
    for title, repo, folder in (
        ("first clone: the proxy signs a JWT, finds the installation and mints a token", REPO, "clone-1"),
        ("second clone of the same repo: the cached token, no GitHub API call", REPO, "clone-2"),
        ("another repo of the same owner: its installation and token are known, no API call", OTHER_REPO, "clone-3"),
    ):
        if not await _clone_and_report(fake, env, root, title, repo, folder):
            return 1

    git_requests = [seen for seen in fake.seen[seen_before:] if seen.is_git]
    with_token = sum(1 for seen in git_requests if seen.authorized)
    _step("What the fake GitHub saw")
    for seen in git_requests:
        flag = "with an installation token" if seen.authorized else "WITHOUT credentials"
        print(f"    {seen.method:4} {seen.path}{'?' + seen.query if seen.query else ''}  -> {seen.status}  {flag}")
    await _show_metrics(proxy_url)
    print(f"\nResult: 3 clones through the proxy; {with_token} of {len(git_requests)} git requests carried a token,")
    print(f"{fake.apps.count('mint')} token was minted for all of them, and no git client ever held a credential.")
    return 0


async def _show_metrics(proxy_url: str) -> None:
    _step(f"The proxy's own view: GET {proxy_url}/metrics (non-zero series, histogram buckets left out)")
    async with aiohttp.ClientSession() as session, session.get(f"{proxy_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        name_and_labels, _, value = line.rpartition(" ")
        wanted = line.startswith("git_token_proxy_") and "_bucket" not in line and "_created" not in line
        if wanted and value not in ("0.0", "NaN"):
            print(f"    {name_and_labels} {value}")


async def _clone_and_report(fake: FakeGitHub, env: dict[str, str], root: Path, title: str, repo: str,
                            folder: str) -> bool:  # fmt: skip
    _step(f"git clone https://github.com/{repo}   ({title})")
    lookups, mints = fake.apps.count("lookup"), fake.apps.count("mint")
    started = time.monotonic()
    result = await run_git("clone", "--quiet", f"https://github.com/{repo}", folder, env=env, cwd=root)
    elapsed = time.monotonic() - started
    _show(result)
    if result.returncode != 0:
        print("    FAILED: the clone through the proxy did not work")
        return False
    readme = (root / folder / "README.md").read_text().splitlines()[0]
    new_lookups, new_mints = fake.apps.count("lookup") - lookups, fake.apps.count("mint") - mints
    print(f"    cloned in {elapsed * 1000:.0f} ms; README.md: {readme}")
    print(f"    GitHub API calls: {_count(new_lookups, 'installation look-up')}, {_count(new_mints, 'token mint')}"
          f"{'  (cache hit)' if not new_lookups and not new_mints else ''}")  # fmt: skip
    return True


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"
