"""CLI: `check` prints the entries; a broken config exits non-zero with a message naming the key, no traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.check import run_check
from proxy.config import parse_config
from proxy.testing import FakeGitHub, generate_app_key, pkcs1_pem, public_pem
from proxy.testing.process import free_port
from tests.support import AcmeApp, app_config
from tests.test_config import alias_bomb

ROOT = Path(__file__).parent.parent

GOOD = """
upstreams:
  - host: github.com
    url: http://127.0.0.1:9   # refuses connections at once: `check` verifies static tokens, and tests stay offline
github:
  appInstallation:
    auth:
      - id: ci-bot
        type: oauth_token
        urlPattern: "(?<baseUrl>github\\\\.com)/other-org/.*"
        token: ${CLI_TEST_TOKEN}
"""


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: `python -m proxy` from any folder finds this tree's package, installed or not.
    env = {**(env if env is not None else os.environ), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def test_check_prints_one_line_per_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(GOOD)
    monkeypatch.setenv("CLI_TEST_TOKEN", "tok-from-env")
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("ci-bot"))
    assert "OAUTH_TOKEN" in line and "other-org" in line and line.rstrip().endswith("github.com")
    assert "tok-from-env" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("server:\n  prot: 80\n", "server.prot: unknown key"),
        ("server:\n  port: eighty\n", "server.port"),
        ("github:\n  appInstallation:\n    auth:\n      - type: oauth_token\n        token: t\n",
         "github.appInstallation.auth[0].urlPattern: Field required"),
        ("github:\n  appInstallation:\n    auth:\n      - type: magic\n        urlPattern: x\n",
         "unknown type 'magic'"),
        ("github:\n  appInstallation:\n    auth:\n      - id: nogroup\n        type: oauth_token\n"
         "        token: t\n        urlPattern: 'github\\.com/.*'\n", "'nogroup'"),
        ("github:\n  appInstallation:\n    httpClientTimeout: forever\n", "httpClientTimeout"),
        ("server: [\n", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)  # fmt: skip
def test_broken_config_exits_nonzero_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    for command in ("check", "serve"):
        done = run_cli(command, "--config", str(config))
        assert done.returncode == 2
        assert named in done.stderr
        assert "Traceback" not in done.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    done = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert "nope.yaml: cannot read config file" in done.stderr and "Traceback" not in done.stderr


def hostile_config_file(tmp_path: Path, kind: str) -> Path:
    """What may land where a config is expected: each would block, exhaust memory or crash a naive loader."""
    path = tmp_path / "config.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "50 MiB":
        path.write_text(("#" + "x" * 1022 + "\n") * 50 * 1024)  # valid YAML all the way: only the size is wrong
    elif kind == "alias bomb":
        path.write_text(alias_bomb(9))
    else:
        path.write_bytes(b"server:\n  host: \xff\n")
    return path


@pytest.mark.parametrize(
    ("kind", "problem"),
    [("fifo", "cannot read config file: not a regular file (a FIFO)"),
     ("/dev/zero", "cannot read config file: not a regular file (a character device)"),
     ("directory", "cannot read config file: not a regular file (a directory)"),
     ("50 MiB", "cannot read config file: larger than 1 MiB"),
     ("alias bomb", "refused: more than 100,000 nodes once aliases are expanded (an alias bomb?)"),
     ("invalid UTF-8", "not valid UTF-8: byte 0xff")],
)  # fmt: skip
def test_hostile_config_files_exit_with_one_line_naming_file_and_problem(
    tmp_path: Path, kind: str, problem: str
) -> None:
    path = hostile_config_file(tmp_path, kind)
    for command in ("check", "serve"):
        done = run_cli(command, "--config", str(path))
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"git-token-proxy: configuration error: {path}: {problem}")


def test_a_port_in_use_is_one_line_too(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  - host: github.com\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--config", str(config), "--port", str(port))
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert f"cannot listen on 127.0.0.1:{port} (--port / server.port" in line and "address already in use" in line


def test_demo_runs_end_to_end() -> None:
    done = run_cli("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 clones through the proxy" in done.stdout and "1 token was minted" in done.stdout
    assert "Traceback" not in done.stderr


def wait_for_healthz(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                assert response.read() == b"ok\n"
                return
        except OSError:
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  - host: github.com\n")
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:  # the context closes the pipe: an unclosed one is a ResourceWarning, and warnings are errors
        try:
            wait_for_healthz(port)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/evil.example/a/b/info/refs?service=git-upload-pack")
            refused.value.close()
            assert refused.value.code == 403
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            process.kill()
        stderr = process.stderr.read() if process.stderr else ""
    assert f"listening on http://127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


APP_ENTRY = """
github:
  appInstallation:
    auth:
      - id: acme-app
        type: github_app_installation
        urlPattern: "(?<baseUrl>github\\\\.com)/acme/.*"
"""


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("        privateKey: /nope.pem\n", "auth[0]: clientId or appId is required"),
        ("        clientId: Iv1\n        privateKey: {missing}\n", "'acme-app': cannot read privateKey file"),
        ("        clientId: Iv1\n        privateKey: {public}\n", "'acme-app': privateKey ({public}) is a public key"),
        ("        clientId: Iv1\n", "auth[0].privateKey: Field required"),
    ],
)
def test_broken_app_entries_exit_nonzero_naming_the_key(
    tmp_path: Path, app_key: rsa.RSAPrivateKey, extra: str, named: str
) -> None:
    public = tmp_path / "public.pem"
    public.write_text(public_pem(app_key))
    paths = {"missing": str(tmp_path / "missing.pem"), "public": str(public)}
    config = tmp_path / "config.yaml"
    config.write_text(APP_ENTRY + extra.format(**paths))
    for command in ("check", "serve"):
        done = run_cli(command, "--config", str(config))
        assert done.returncode == 2, done.stderr
        assert named.format(**paths) in done.stderr
        assert "Traceback" not in done.stderr


async def test_check_proves_the_key_and_mints_for_a_repo_without_printing_the_token(
    fake_github: FakeGitHub, acme_app: AcmeApp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = parse_config(app_config(fake_github.url, acme_app))
    assert await run_check(config, "config.yaml", "github.com/acme/private") == 0
    out = capsys.readouterr().out
    assert "acme-app: key SHA256:" in out and "GitHub App 'acme-app'" in out
    assert f"installation {acme_app.installation.id}: minted a token (not shown)" in out
    assert "permissions contents:write, metadata:read" in out
    (token,) = fake_github.apps.minted_tokens
    assert token not in out


async def test_check_fails_when_github_rejects_the_key(
    fake_github: FakeGitHub, acme_app: AcmeApp, capsys: pytest.CaptureFixture[str]
) -> None:
    acme_app.key_file.write_text(pkcs1_pem(generate_app_key()))
    config = parse_config(app_config(fake_github.url, acme_app))
    assert await run_check(config, "config.yaml", None) == 1
    assert "FAILED: GitHub rejected the JWT for 'acme-app'" in capsys.readouterr().out


def test_serve_refuses_a_public_bind_without_access_control(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  - host: github.com\n")
    done = run_cli("serve", "--config", str(config), "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert "not a loopback address and access control is off" in done.stderr and "Traceback" not in done.stderr


def test_yaml_errors_never_quote_the_offending_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("github:\n  appInstallation:\n    auth:\n      - token: ghp_SECRETSECRETSECRET: [\n")
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 2 and "not valid YAML" in done.stderr and "line 4" in done.stderr
    assert "SECRETSECRET" not in done.stderr


# ---------------------------------------------------------------- the first hour: no tracebacks (issue 12, item 4)


def _taken_port() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def first_hour_mistake(tmp_path: Path, kind: str) -> tuple[list[str], dict[str, str], str]:
    """What a new user gets wrong, as (arguments, extra environment, what the one line must say)."""
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  - host: github.com\n")
    app = "github:\n  appInstallation:\n    auth:\n      - type: github_app_installation\n        clientId: Iv1\n"
    serve = ["serve", "--config", str(config)]
    if kind == "port out of range":
        return [*serve, "--port", "99999"], {}, "'99999' is not a port number (0-65535)"
    if kind == "metricsPort out of range":
        config.write_text("server:\n  metricsPort: 99999\n")
        return serve, {}, "server.metricsPort: Input should be less than or equal to 65535"
    if kind == "missing tls.caFile":
        config.write_text("tls:\n  caFile: corp-ca.pem\n")
        return serve, {}, f"tls.caFile: cannot read {tmp_path}/corp-ca.pem: No such file or directory"
    if kind == "tls.caFile is no PEM":
        (tmp_path / "corp-ca.pem").write_text("not a certificate\n")
        config.write_text("tls:\n  caFile: corp-ca.pem\n")
        return serve, {}, f"tls.caFile: {tmp_path}/corp-ca.pem holds no PEM certificate"
    if kind == "unreadable tls.caFile":
        (tmp_path / "ca-dir.pem").mkdir()
        config.write_text(f"tls:\n  caFile: {tmp_path}/ca-dir.pem\n")
        return serve, {}, f"cannot read {tmp_path}/ca-dir.pem: not a regular file (a directory)"
    if kind == "--log-level verbose":
        return [*serve, "--log-level", "verbose"], {}, "'verbose' is not a log level; use one of DEBUG, INFO"
    if kind == "empty ${VAR} as privateKey":
        config.write_text(app + "        urlPattern: '(?<baseUrl>github\\.com)/.*'\n        privateKey: ${APP_KEY}\n")
        return (
            serve,
            {"APP_KEY": ""},
            "privateKey is empty: give the path to the app's .pem, or the PEM itself (${APP_KEY} is set but empty)",
        )
    if kind == "relative privateKey":
        config.write_text(app + "        urlPattern: '(?<baseUrl>github\\.com)/.*'\n        privateKey: keys/app.pem\n")
        return serve, {}, f"cannot read privateKey file {tmp_path}/keys/app.pem: No such file or directory"
    assert kind == "double-quoted urlPattern"
    config.write_text(app + '        urlPattern: "(?<baseUrl>github\\.com)/.*"\n        privateKey: /k.pem\n')
    return serve, {}, "unknown escape character '.' at line 6, column 40; in double quotes YAML reads backslashes"


FIRST_HOUR_MISTAKES = [
    "port out of range", "metricsPort out of range", "missing tls.caFile", "tls.caFile is no PEM",
    "unreadable tls.caFile", "--log-level verbose", "empty ${VAR} as privateKey", "relative privateKey",
    "double-quoted urlPattern",
]  # fmt: skip


@pytest.mark.parametrize("kind", FIRST_HOUR_MISTAKES)
def test_first_hour_mistakes_are_one_line_exit_2_naming_the_fix(tmp_path: Path, kind: str) -> None:
    args, extra, says = first_hour_mistake(tmp_path, kind)
    done = run_cli(*args, env={**os.environ, **extra}, cwd=Path("/"))  # relative paths: the config's folder counts
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()  # one line: no traceback, no "Exception ignored ... __del__" after it
    assert says in line


@pytest.mark.parametrize("which", ["port", "metricsPort"])
def test_a_taken_port_names_the_setting(tmp_path: Path, which: str) -> None:
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        if which == "port":
            config.write_text(f"server:\n  port: {port}\n")
            named = f"cannot listen on 127.0.0.1:{port} (--port / server.port / GIT_TOKEN_PROXY_PORT)"
        else:
            config.write_text(f"server:\n  port: {free_port()}\n  metricsPort: {port}\n")
            named = f"cannot listen on 127.0.0.1:{port} (server.metricsPort)"
        done = run_cli("serve", "--config", str(config))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert named in line and "another process holds it" in line


# ---------------------------------------------------------------- config from the environment (item 2)


def test_env_app_settings_and_a_config_file_do_not_mix(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("upstreams:\n  - host: github.com\n")
    env = {**os.environ, "GIT_TOKEN_PROXY_CLIENT_ID": "Iv23liExample", "GIT_TOKEN_PROXY_CONFIG": str(config)}
    for command in ("serve", "check"):
        done = run_cli(command, env=env)
        assert done.returncode == 2
        (line,) = done.stderr.splitlines()
        assert "--config (or GIT_TOKEN_PROXY_CONFIG) cannot be combined with GIT_TOKEN_PROXY_CLIENT_ID" in line


@pytest.mark.parametrize(
    ("variables", "says"),
    [({}, "no configuration: give --config FILE (or GIT_TOKEN_PROXY_CONFIG), or describe one GitHub App"),
     ({"GIT_TOKEN_PROXY_PRIVATE_KEY": "/k.pem"}, "GIT_TOKEN_PROXY_CLIENT_ID (--client-id) or GIT_TOKEN_PROXY_APP_ID"),
     ({"GIT_TOKEN_PROXY_CLIENT_ID": "Iv1"}, "GIT_TOKEN_PROXY_PRIVATE_KEY (--private-key) is required"),
     ({"GIT_TOKEN_PROXY_CLIENT_ID": "Iv1", "GIT_TOKEN_PROXY_PRIVATE_KEY": "/nope/app.pem"},
      "GIT_TOKEN_PROXY_PRIVATE_KEY (--private-key): cannot read /nope/app.pem: No such file or directory"),
     ({"GIT_TOKEN_PROXY_CLIENT_ID": "Iv1", "GIT_TOKEN_PROXY_PRIVATE_KEY": "-----BEGIN RSA PRIVATE KEY-----\\nMII"},
      "GIT_TOKEN_PROXY_PRIVATE_KEY (--private-key) (inline privateKey) cannot be parsed"),
     ({"GIT_TOKEN_PROXY_APP_ID": "-3", "GIT_TOKEN_PROXY_PRIVATE_KEY": "/k.pem"},
      "GIT_TOKEN_PROXY_APP_ID (--app-id): '-3' is not a positive integer id"),
     ({"GIT_TOKEN_PROXY_CLIENT_ID": "Iv1", "GIT_TOKEN_PROXY_PRIVATE_KEY": "/k.pem",
       "GIT_TOKEN_PROXY_GITHUB_URL": "ghe.example.com"}, "GIT_TOKEN_PROXY_GITHUB_URL (--github-url): 'ghe.example"),
     ({"GIT_TOKEN_PROXY_CLIENT_ID": "Iv1", "GIT_TOKEN_PROXY_PRIVATE_KEY": "/k.pem", "GIT_TOKEN_PROXY_PORT": "http"},
      "GIT_TOKEN_PROXY_PORT (--port): 'http' is not a port number")],
)  # fmt: skip
def test_env_mistakes_name_the_variable(variables: dict[str, str], says: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GIT_TOKEN_PROXY_")}
    done = run_cli("serve", env={**clean, **variables})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert says in line
    assert "MII" not in line.replace("(inline privateKey)", "")  # never the key itself


def test_env_flags_stand_for_the_variables(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> None:
    key = tmp_path / "app.pem"
    key.write_text(pkcs1_pem(app_key))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GIT_TOKEN_PROXY_")}
    done = run_cli(
        "check", "--client-id", "Iv23liExample", "--private-key", "app.pem", "--github-url", "http://127.0.0.1:9",
        env=clean, cwd=tmp_path,
    )  # fmt: skip
    # The one catch-all entry for the GitHub URL's host, with the key read from the path given (relative to here).
    line = next(line for line in done.stdout.splitlines() if line.startswith("github-app"))
    assert "GITHUB_APP_INSTALLATION" in line and "(?<baseUrl>127\\.0\\.0\\.1:9)/.*" in line
    assert line.rstrip().endswith("127.0.0.1:9")
    assert "github-app: key SHA256:" in done.stdout and "FAILED: GitHub API at http://127.0.0.1:9/api/v3" in done.stdout
    assert done.returncode == 1


# ---------------------------------------------------------------- check must not pass what cannot work (item 5)


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return config


STATIC = "      - id: {id}\n        type: oauth_token\n        urlPattern: '{pattern}'\n        token: tok-{id}-1234\n"
OFFLINE = "upstreams:\n  - host: github.com\n    url: http://127.0.0.1:9\ngithub:\n  appInstallation:\n    auth:\n"


def test_check_fails_an_entry_whose_host_is_not_an_upstream(tmp_path: Path) -> None:
    config = write_config(tmp_path, OFFLINE + STATIC.format(id="ghe", pattern="(?<baseUrl>ghe\\.corp\\.example)/.*"))
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "(none: 'ghe.corp.example' is not in upstreams)" in done.stdout
    assert (
        "can never match: its baseUrl names 'ghe.corp.example', which is not in upstreams (github.com)" in done.stdout
    )


def test_check_names_the_scheme_in_a_pattern(tmp_path: Path) -> None:
    config = write_config(tmp_path, OFFLINE + STATIC.format(id="web", pattern="(?<baseUrl>https://github\\.com)/.*"))
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 1 and "drop the 'https://'" in done.stdout


def test_check_fails_an_entry_shadowed_by_an_earlier_catch_all(tmp_path: Path) -> None:
    entries = STATIC.format(id="everything", pattern="(?<baseUrl>github\\.com)/.*") + STATIC.format(
        id="acme-only", pattern="(?<baseUrl>github\\.com)/acme/.*"
    )
    done = run_cli("check", "--config", str(write_config(tmp_path, OFFLINE + entries)))
    assert done.returncode == 1
    row = next(line for line in done.stdout.splitlines() if line.startswith("entry acme-only"))
    assert "FAILED" in row and "never used: 'everything' comes first and matches every repo on github.com" in row
    assert "entry everything" in done.stdout and "1 problem(s)" in done.stdout


def test_check_of_an_empty_config_fails_unless_allowed(tmp_path: Path) -> None:
    config = write_config(tmp_path, "upstreams:\n  - host: github.com\n")
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 1 and "auth entries  FAILED  none: every repo goes without credentials" in done.stdout
    allowed = run_cli("check", "--config", str(config), "--allow-empty")
    assert allowed.returncode == 0 and "WARNING" in allowed.stdout


async def run_cli_async(*args: str) -> tuple[int, str]:
    """The CLI as a subprocess without blocking the loop the fake GitHub runs on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_check_verifies_static_tokens_with_upstream(fake_github: FakeGitHub, tmp_path: Path) -> None:
    fake_github.create_repo("acme/private", {"a": b"a"})
    fake_github.add_token("tok-good-1234", repos=["acme/private"])
    entries = STATIC.format(id="good", pattern="(?<baseUrl>github\\.com)/acme/.*") + STATIC.format(
        id="revoked", pattern="(?<baseUrl>github\\.com)/other/.*"
    )
    config = write_config(tmp_path, OFFLINE.replace("http://127.0.0.1:9", fake_github.url) + entries)
    status, output = await run_cli_async("check", "--config", str(config), "--repo", "github.com/acme/private")
    assert status == 1, output
    rows = {line.split()[1]: line for line in output.splitlines() if line.startswith("token ")}
    assert "OK" in rows["good"] and "accepts it (GET /rate_limit)" in rows["good"]
    assert "FAILED" in rows["revoked"] and "rejects it (401 on GET /rate_limit)" in rows["revoked"]
    assert "info/refs answered 200 with the token" in output  # --repo: one authenticated info/refs
    assert "tok-good-1234" not in output and "tok-revoked" not in output


async def test_check_refuses_an_app_id_that_is_another_app(
    fake_github: FakeGitHub, acme_app: AcmeApp, tmp_path: Path
) -> None:
    data = app_config(fake_github.url, acme_app, appId=acme_app.app.app_id + 1)
    config = write_config(tmp_path, yaml.safe_dump(data))
    status, output = await run_cli_async("check", "--config", str(config))
    assert status == 1, output
    assert f"appId {acme_app.app.app_id + 1} is not the app of clientId {acme_app.app.client_id!r}" in output
    data = app_config(fake_github.url, acme_app, appId=acme_app.app.app_id)
    status, output = await run_cli_async("check", "--config", str(write_config(tmp_path, yaml.safe_dump(data))))
    assert status == 0 and "clientId is used; appId" in output, output
