"""The first hour (issue 12), through the real CLI, real git and the fake GitHub: a start from environment variables
alone, the README's quick start followed as written, refusals that say the fix, remembered refusals that a SIGHUP
clears, logs and probes that read well."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.testing import FakeGitHub, generate_app_key, insteadof_env, pkcs1_pem
from proxy.testing.process import ServeProcess, free_port
from tests.support import AcmeApp, Git, StartProxy, app_config

ROOT = Path(__file__).parent.parent.parent


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any GIT_TOKEN_PROXY_* the developer may have set, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_TOKEN_PROXY_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture
def env_serve(serve_process: Any) -> Any:
    """`python -m proxy serve` without a config file: everything comes from the environment."""

    async def start(env: dict[str, str], *extra: str) -> ServeProcess:
        process: ServeProcess = await serve_process(None, *extra, env=env)
        return process

    return start


# ---------------------------------------------------------------- item 2: no config file for one app


async def test_env_only_start_clones_and_logs_the_insteadof_line_without_the_key(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, env_serve: Any
) -> None:
    pem = pkcs1_pem(acme_app.key)  # the PEM itself in the variable, as `"$(cat app.pem)"` puts it
    env = clean_environment(
        GIT_TOKEN_PROXY_CLIENT_ID=acme_app.app.client_id,
        GIT_TOKEN_PROXY_PRIVATE_KEY=pem,
        GIT_TOKEN_PROXY_GITHUB_URL=fake_github.url,  # the fake stands in for github.com; its API is <url>/api/v3
    )
    proxy = await env_serve(env, "--log-format", "text")
    github_host = fake_github.url.removeprefix("http://")
    line = f'git config --global url."http://127.0.0.1:{proxy.port}/{github_host}/".insteadOf "{fake_github.url}/"'
    await proxy.wait_for(lambda: line in proxy.stderr, "the insteadOf line")

    git.env.update(insteadof_env(proxy.url, host=github_host))
    git.env["GIT_CONFIG_VALUE_0"] = f"{fake_github.url}/"  # the fake is plain http
    await git("clone", "--quiet", f"{fake_github.url}/acme/private", "private")
    assert (git.workdir / "private" / "README.md").read_bytes() == b"# private\n"
    assert fake_github.apps.count("mint") == 1

    assert await proxy.stop() == 0
    key_body = "".join(pem.splitlines()[1:-1])
    assert "PRIVATE KEY" not in proxy.stderr and key_body[:40] not in proxy.stderr
    assert "Traceback" not in proxy.stderr


async def test_env_start_reloads_on_sighup_and_forgets_not_installed(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, env_serve: Any
) -> None:
    """The environment's config reloads like a file (SIGHUP), so "install the app, then SIGHUP" works here too."""
    env = clean_environment(
        GIT_TOKEN_PROXY_CLIENT_ID=acme_app.app.client_id,
        GIT_TOKEN_PROXY_PRIVATE_KEY=str(acme_app.key_file),
        GIT_TOKEN_PROXY_GITHUB_URL=fake_github.url,
    )
    proxy = await env_serve(env)
    github_host = fake_github.url.removeprefix("http://")
    url = f"{proxy.url}/{github_host}/newco/app"
    refused = await git("ls-remote", url, check=False)
    assert "is not installed on newco/app" in refused.stderr

    fake_github.apps.add_installation(acme_app.app, "newco")
    fake_github.create_repo("newco/app", {"a.txt": b"a"})
    await proxy.signal(signal.SIGHUP)
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the reload")
    await git("ls-remote", url)
    assert await proxy.stop() == 0
    assert "reload rejected" not in proxy.stderr


# ---------------------------------------------------------------- item 1: the README's quick start, as written


def quick_start_commands() -> list[str]:
    """The shell lines of the README's quick start block (the one that starts `serve`), in order."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    block = next(block for block in blocks if "git-token-proxy serve" in block and "GIT_TOKEN_PROXY_CLIENT_ID" in block)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


async def run_shell(line: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", line, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


class FakeGitHubCommand:
    """`python -m proxy.testing`, as the README has a newcomer run it: its output, and what it wrote."""

    def __init__(self, tmp_path: Path, *repos: str) -> None:
        self.port, self.folder = free_port(), tmp_path / "fake"
        self.repos = repos
        self.output = tmp_path / "fake.out"
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> FakeGitHubCommand:
        args = ["-m", "proxy.testing", "--port", str(self.port), "--write-config", str(self.folder)]
        for repo in self.repos:
            args += ["--repo", repo]
        with self.output.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdout=out, stderr=subprocess.STDOUT, env=clean_environment()
            )
        for _ in range(400):
            if "Ctrl-C stops the fake" in self.printed:
                return self
            assert self.process.returncode is None, self.printed
            await asyncio.sleep(0.05)
        raise AssertionError(f"python -m proxy.testing did not start:\n{self.printed}")

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(self.process.wait(), 20) == 0

    @property
    def printed(self) -> str:
        return self.output.read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load((self.folder / "config.yaml").read_text())
        return loaded


def newcomer_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A new shell: a HOME of its own, the git-token-proxy command on PATH, no system git config, no prompt."""
    (tmp_path / "home").mkdir(exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)  # where the README's commands put the git-token-proxy command
    return clean_environment(HOME=str(tmp_path / "home"), PATH=f"{bin_dir}:{os.environ['PATH']}",
                             GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", **extra)  # fmt: skip


def activate_script() -> Path:
    """The .venv the README's commands make (the suite runs in it: scripts/test)."""
    for venv in (ROOT / ".venv", Path(sys.prefix)):
        if (venv / "bin" / "activate").is_file():
            return venv / "bin" / "activate"
    raise AssertionError("not run from a virtual environment: run the suite with scripts/test, as the README says")


async def test_readme_quick_start_works_against_python_m_proxy_testing(tmp_path: Path) -> None:
    """Each line as the README has it, with only what a user fills in (the Client ID, the key's path, a free port)
    changed: github.com stays github.com, and UPSTREAM_URL and API_URL point the proxy at the fake's address."""
    home = tmp_path / "home"
    (home / "Downloads").mkdir(parents=True)
    async with FakeGitHubCommand(tmp_path, "acme/app") as fake:
        [entry] = fake.config["github"]["appInstallation"]["auth"]
        shutil.copy(entry["privateKey"], home / "Downloads" / "my-app.private-key.pem")
        port = free_port()
        substitutions = [
            ("Iv23liXXXXXXXXXXXXXX", entry["clientId"]),
            ("127.0.0.1:8080", f"127.0.0.1:{port}"),
            ("source .venv/bin/activate", f"source {activate_script()}"),
        ]
        env = newcomer_environment(tmp_path, GIT_TOKEN_PROXY_UPSTREAM_URL=fake.url, GIT_TOKEN_PROXY_API_URL=fake.url,
                                   GIT_TOKEN_PROXY_PORT=str(port))  # fmt: skip
        work = tmp_path / "work"
        work.mkdir()
        server: asyncio.subprocess.Process | None = None
        try:
            for line in quick_start_commands():
                for placeholder, value in substitutions:
                    line = line.replace(placeholder, value)
                if line.startswith("export "):
                    name, _, value = line.removeprefix("export ").partition("=")
                    env[name] = (await run_shell(f"printf %s {value}", env, work))[1]  # the shell's own expansion
                elif "git-token-proxy serve" in line:
                    command = line.removesuffix("&").strip()
                    server = await asyncio.create_subprocess_exec(
                        "bash", "-c", f"exec {command}", env=env, cwd=work, stderr=asyncio.subprocess.DEVNULL
                    )
                    await wait_until_answering(port)
                else:
                    status, output = await run_shell(line, env, work)
                    assert status == 0, f"{line}\n{output}"
        finally:
            if server is not None and server.returncode is None:
                server.terminate()
                await server.wait()
    assert (work / "app" / "README.md").read_bytes().startswith(b"# acme/app\n")


async def test_the_fake_github_command_prints_the_commands_that_then_clone(tmp_path: Path) -> None:
    """The commands `python -m proxy.testing` prints, run as printed (the config-file form), clone
    https://github.com/acme/app from the fake."""
    async with FakeGitHubCommand(tmp_path, "acme/app", "acme/lib") as fake:
        printed = [line.strip() for line in fake.printed.splitlines()]
        [serve_line] = [line for line in printed if line.startswith("git-token-proxy serve --config")]
        port = free_port()
        env = newcomer_environment(tmp_path)
        server = await asyncio.create_subprocess_exec(
            "bash", "-c", f"exec {serve_line} --port {port}", env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            await wait_until_answering(port)
            for line in [line for line in printed if line.startswith("git ")]:
                status, output = await run_shell(line.replace("127.0.0.1:8080", f"127.0.0.1:{port}"), env, tmp_path)
                assert status == 0, f"{line}\n{output}"
        finally:
            server.terminate()
            await server.wait()
    assert (tmp_path / "app" / "README.md").read_bytes().startswith(b"# acme/app\n")
    assert "acme/app, acme/lib (private)" in fake.printed


async def wait_until_answering(port: int) -> None:
    for _ in range(400):  # 20 s at most
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("the proxy started as the README says did not listen")


# ---------------------------------------------------------------- item 3: refusals that say the fix


async def test_path_mistakes_name_the_host_and_the_insteadof_form(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    for rule, expected in [
        (f"{proxy}/", "host 'acme' is not an allowed upstream of this proxy (configured: github.com)"),
        (
            f"{proxy}/github.com",
            "host 'github.comacme' is not an allowed upstream of this proxy (configured: github.com); a slash is "
            "missing after 'github.com': the insteadOf URL must end with '/github.com/'",
        ),
    ]:
        git.env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{rule}.insteadOf",
                        "GIT_CONFIG_VALUE_0": "https://github.com/"})  # fmt: skip
        failed = await git("clone", "https://github.com/acme/private.git", "out", check=False)
        assert failed.returncode != 0 and not failed.prompted
        assert f"remote: {expected}" in failed.stderr
        assert 'url."http://<this proxy>/github.com/".insteadOf "https://github.com/"' in failed.stderr
        assert "only git smart-HTTP endpoints" not in failed.stderr


async def test_not_installed_says_it_is_remembered_and_sighup_retries(
    fake_github: FakeGitHub,
    acme_app: AcmeApp,
    git: Git,
    serve_process: Any,
) -> None:
    config = app_config(fake_github.url, acme_app, urlPattern=r"(?<baseUrl>github\.com)/.*")
    proxy = await serve_process(config)
    url = f"{proxy.url}/github.com/newco/app"
    refused = await git("clone", url, "first", check=False)
    assert (
        "remote: GitHub App 'acme-app' is not installed on newco/app (or cannot see it) (app 'acme-app'); this "
        "answer is remembered for up to 300 s: install the app on newco (or add the repo to its selection), then "
        "reload the proxy (SIGHUP) to retry at once"
    ) in refused.stderr

    fake_github.apps.add_installation(acme_app.app, "newco")  # the user installs the app
    fake_github.create_repo("newco/app", {"a.txt": b"a"})
    still = await git("clone", url, "second", check=False)
    assert still.returncode != 0 and "remembered for up to 300 s" in still.stderr  # as the message said
    await proxy.signal(signal.SIGHUP)
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the reload")
    await git("clone", "--quiet", url, "third")
    assert (git.workdir / "third" / "a.txt").read_bytes() == b"a"
    assert await proxy.stop() == 0


@pytest.mark.parametrize(
    ("mistake", "says"),
    [("a key of another app", "GitHub rejected the JWT for 'acme-app': A JSON web token could not be decoded (the "
      "private key does not belong to the app with clientId"),
     ("a wrong clientId", "GitHub rejected the JWT for 'acme-app': Integration not found (no GitHub App has "
      "clientId 'Iv1.not-an-app': copy the Client ID from the app's settings page"),
     ("a permission not granted", "GitHub refused to mint a token for 'acme-app': The permissions requested are not "
      "granted to this installation. Asked for administration:write; the installation on acme (app 'acme-app') "
      "has contents:write, metadata:read: grant the permission in the app's settings")],
)  # fmt: skip
async def test_githubs_words_come_with_our_hint(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, mistake: str, says: str
) -> None:
    entry: dict[str, Any] = {}
    if mistake == "a key of another app":
        acme_app.key_file.write_text(pkcs1_pem(generate_app_key()))
    elif mistake == "a wrong clientId":
        entry["clientId"] = "Iv1.not-an-app"
    else:
        entry["permissions"] = {"administration": "write"}
    proxy = await start_proxy(app_config(fake_github.url, acme_app, **entry))
    failed = await git("clone", f"{proxy}/github.com/acme/private", "out", check=False)
    assert failed.returncode != 0 and not failed.prompted
    assert f"remote: {says}" in failed.stderr


# ---------------------------------------------------------------- item 6: the healthcheck follows the port


async def test_healthcheck_finds_the_proxy_from_the_same_config(
    fake_github: FakeGitHub,
    acme_app: AcmeApp,
    tmp_path: Path,
    serve_process: Any,
) -> None:
    config = app_config(fake_github.url, acme_app)
    metrics_port = free_port()
    config["server"] = {"metricsPort": metrics_port}
    proxy = await serve_process(config)
    for extra, answer in [((), f"http://127.0.0.1:{metrics_port}/healthz: ok"),
                          (("--ready",), f"http://127.0.0.1:{metrics_port}/readyz: ready")]:  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "healthcheck", "--config", str(proxy.config_path), *extra,
            stdout=asyncio.subprocess.PIPE, env=clean_environment(),
        )  # fmt: skip
        output, _ = await process.communicate()
        assert process.returncode == 0 and output.decode().strip() == answer
    assert await proxy.stop() == 0
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "healthcheck", "--config", str(proxy.config_path),
        stdout=asyncio.subprocess.PIPE, env=clean_environment(),
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 1 and "not answering" in output.decode()


# ---------------------------------------------------------------- item 7: logs that read well


async def test_text_logs_make_audit_lines_text_and_show_no_none(
    fake_github: FakeGitHub,
    acme_app: AcmeApp,
    git: Git,
    serve_process: Any,
) -> None:
    proxy = await serve_process(app_config(fake_github.url, acme_app), "--log-format", "text")
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "out")
    assert await proxy.stop() == 0
    lines = proxy.stderr.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{")]  # nothing JSON in a text log
    assert "[None]" not in proxy.stderr
    audit = [line for line in lines if " git_token_proxy.audit " in line]
    assert audit and all(re.search(r"INFO git_token_proxy\.audit \[[0-9a-f]{16}\]: (GET|POST) github\.com", a)
                         for a in audit)  # fmt: skip
    assert any("upload-pack 200 " in line and "entry=acme-app" in line for line in audit)


async def test_json_audit_lines_carry_level_and_logger_like_every_line(
    fake_github: FakeGitHub,
    acme_app: AcmeApp,
    git: Git,
    serve_process: Any,
) -> None:
    proxy = await serve_process(app_config(fake_github.url, acme_app), "--log-format", "json")
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "out")
    assert await proxy.stop() == 0
    lines = [json.loads(line) for line in proxy.stderr.splitlines()]
    audit = [line for line in lines if line.get("logger") == "git_token_proxy.audit"]
    assert audit and all(line["level"] == "INFO" and "message" not in line for line in audit)
    assert all({"ts", "request_id", "repo", "status", "bytes_out"} <= line.keys() for line in audit)
    startup = [line["message"] for line in lines if "insteadOf" in line.get("message", "")]
    assert startup == [f'clients: git config --global url."{proxy.url}/github.com/".insteadOf "https://github.com/"']


def test_shlex_reads_the_quick_start_exports() -> None:
    """The quick start's exports are plain shell: what the test above runs is what a user pastes."""
    exports = [line for line in quick_start_commands() if line.startswith("export ")]
    assert {shlex.split(line)[1].partition("=")[0] for line in exports} >= {
        "GIT_TOKEN_PROXY_CLIENT_ID",
        "GIT_TOKEN_PROXY_PRIVATE_KEY",
    }


# ---------------------------------------------------------------- item 9: the fake GitHub, as the README shows it


def test_readme_fake_github_example_runs_as_written(tmp_path: Path) -> None:
    """The README's example, in a test file of its own, run by pytest as a user's CI would (warnings as errors,
    so that the harness must stop both servers cleanly)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (example,) = [block for block in blocks if "proxied_github" in block]
    (tmp_path / "test_readme_example.py").write_text(example)
    # A project of the user's own, with pytest-asyncio installed (it comes with our test extra): newer releases
    # warn, and so fail under -W error, unless the loop scope is set, as any such project's config does.
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "test_readme_example.py"],
        cwd=tmp_path, env=clean_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


# ---------------------------------------------------------------- issue 19, item 6: git pointed the wrong way


async def test_git_using_the_proxy_as_an_http_proxy_gets_the_insteadof_fix(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, caplog: pytest.LogCaptureFixture
) -> None:
    """`http.proxy` (or HTTPS_PROXY) makes git send CONNECT for https:// URLs, and absolute-form requests for
    http:// ones: each gets the insteadOf line, in the answer and in one log line, not an allowedHosts hint."""
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    insteadof = f'url."{proxy}/github.com/".insteadOf "https://github.com/"'
    tunnelled = await git("-c", f"http.proxy={proxy}", "ls-remote", "https://github.com/acme/private", check=False)
    assert tunnelled.returncode != 0 and "CONNECT tunnel failed, response 405" in tunnelled.stderr
    forwarded = await git("-c", f"http.proxy={proxy}", "ls-remote", "http://github.com/acme/private", check=False)
    assert forwarded.returncode != 0 and not forwarded.prompted
    assert "remote: git-token-proxy is not an HTTP proxy" in forwarded.stderr and insteadof in forwarded.stderr
    assert "allowedHosts" not in forwarded.stderr
    hints = [r.getMessage() for r in caplog.records if r.name == "git_token_proxy.edge"]
    assert any(m.startswith("a CONNECT request") and insteadof in m for m in hints)
    assert any(m.startswith("a request for an absolute URL") and insteadof in m for m in hints)
    again = await git("-c", f"http.proxy={proxy}", "ls-remote", "https://github.com/acme/private", check=False)
    assert again.returncode != 0
    assert len([r for r in caplog.records if r.getMessage().startswith("a CONNECT request")]) == 1  # rate-limited


async def test_a_tls_handshake_on_the_plain_port_is_logged_with_the_fix(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git, caplog: pytest.LogCaptureFixture
) -> None:
    """https:// in the insteadOf line: git says `gnutls_handshake() failed` (or `wrong version number`), which
    names nothing of the proxy; the proxy's log says what to write instead."""
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    wrong = proxy.replace("http://", "https://")
    done = await git("-c", f'url.{wrong}/github.com/.insteadOf=https://github.com/', "ls-remote",
                     "https://github.com/acme/private", check=False)  # fmt: skip
    assert done.returncode != 0
    await asyncio.sleep(0.2)  # the access-log hook runs once the 400 is written
    [hint] = [r.getMessage() for r in caplog.records if "TLS handshake on the plain-HTTP port" in r.getMessage()]
    assert f'url."{proxy}/github.com/".insteadOf "https://github.com/"' in hint


async def test_with_access_control_the_printed_lines_clone_with_the_token_from_a_file(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any, tmp_path: Path
) -> None:
    """Issue 19, item 10: the insteadOf line alone leaves git without the client token ("could not read
    Username"); the credential-helper line the proxy prints beside it, run as printed, supplies it from a file."""
    config = app_config(fake_github.url, acme_app)
    config["access"] = {"clients": [{"name": "ci", "token": "a-client-token-0001", "repos": [".*"]}]}
    proxy = await serve_process(config, "--log-format", "json")
    printed = [line["message"].removeprefix("clients: ").removeprefix("and their token, from a file: ")
               for line in proxy.log_lines() if line.get("message", "").startswith("clients: ")]  # fmt: skip
    assert len(printed) == 2 and printed[1].startswith("git config --global credential.")
    home = Path(git.env["HOME"])
    (home / ".git-token-proxy-token").write_text("a-client-token-0001\n")
    for line in printed:
        code, output = await run_shell(line, git.env, tmp_path)
        assert code == 0, output
    await git("clone", "--quiet", "https://github.com/acme/private", "private")
    assert (git.workdir / "private" / "README.md").read_bytes() == b"# private\n"
