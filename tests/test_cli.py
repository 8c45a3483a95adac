"""CLI: `check` prints the entries; a broken config exits non-zero with a message naming the key, no traceback."""

from __future__ import annotations

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
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.check import run_check
from proxy.config import parse_config
from proxy.testing import FakeGitHub, generate_app_key, pkcs1_pem, public_pem
from tests.conftest import AcmeApp, app_config
from tests.test_config import alias_bomb

GOOD = """
upstreams:
  - host: github.com
github:
  appInstallation:
    auth:
      - id: ci-bot
        type: oauth_token
        urlPattern: "(?<baseUrl>github\\\\.com)/other-org/.*"
        token: ${CLI_TEST_TOKEN}
"""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60, env=env)


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
        done = run_cli("serve", "--config", str(config), "--port", str(taken.getsockname()[1]))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "address already in use" in line


def test_demo_runs_end_to_end() -> None:
    done = run_cli("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 clones through the proxy" in done.stdout and "1 token was minted" in done.stdout
    assert "Traceback" not in done.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    assert "not a loopback address and access.clients is empty" in done.stderr and "Traceback" not in done.stderr


def test_yaml_errors_never_quote_the_offending_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("github:\n  appInstallation:\n    auth:\n      - token: ghp_SECRETSECRETSECRET: [\n")
    done = run_cli("check", "--config", str(config))
    assert done.returncode == 2 and "not valid YAML" in done.stderr and "line 4" in done.stderr
    assert "SECRETSECRET" not in done.stderr
