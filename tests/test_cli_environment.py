"""The CLI's second hour: the environment is even (every setting has its variable, an unknown one is named with the
closest known one), the help is real (each command its own arguments, metavars, examples), and typos get a "did you
mean"."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.testing import pkcs1_pem
from proxy.testing.process import free_port
from tests.test_cli import run_cli, wait_for_healthz

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("GIT_TOKEN_PROXY_")}
STATIC = "upstreams:\n  - host: github.com\n"
TOKEN_ENTRY = (
    "github:\n  appInstallation:\n    auth:\n      - type: oauth_token\n"
    "        urlPattern: '(?<baseUrl>github\\.com)/.*'\n"
)


def serve_briefly(args: list[str], env: dict[str, str], port: int) -> str:
    """Starts `serve`, waits until it answers, stops it; its stderr."""
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    ) as process:  # fmt: skip
        try:
            wait_for_healthz(port)
        finally:
            process.terminate()
            process.wait(timeout=20)
        return process.stderr.read() if process.stderr else ""


def test_log_format_and_level_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC)
    port = free_port()
    env = {**CLEAN, "GIT_TOKEN_PROXY_LOG_FORMAT": "text", "GIT_TOKEN_PROXY_LOG_LEVEL": "debug"}
    stderr = serve_briefly(["--config", str(config), "--port", str(port)], env, port)
    assert " DEBUG " in stderr and f"listening on http://127.0.0.1:{port}" in stderr
    assert not any(line.startswith("{") for line in stderr.splitlines()), "text, not JSON"
    # A flag wins over its variable.
    port = free_port()
    stderr = serve_briefly(["--config", str(config), "--port", str(port), "--log-format", "json"], env, port)
    assert all(line.startswith("{") for line in stderr.splitlines() if line.strip())


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [("GIT_TOKEN_PROXY_LOG_LEVEL", "loud", "GIT_TOKEN_PROXY_LOG_LEVEL: 'loud' is not a log level"),
     ("GIT_TOKEN_PROXY_LOG_FORMAT", "xml", "GIT_TOKEN_PROXY_LOG_FORMAT: 'xml' is not json or text")],
)  # fmt: skip
def test_a_bad_logging_variable_is_one_line_naming_it(tmp_path: Path, variable: str, value: str, says: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC)
    done = run_cli("serve", "--config", str(config), env={**CLEAN, variable: value})
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert says in line


def test_private_key_file_is_git_syncs_spelling(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> None:
    key = tmp_path / "app.pem"
    key.write_text(pkcs1_pem(app_key))
    env = {**CLEAN, "GIT_TOKEN_PROXY_CLIENT_ID": "Iv23liExample", "GIT_TOKEN_PROXY_PRIVATE_KEY_FILE": str(key),
           "GIT_TOKEN_PROXY_GITHUB_URL": "http://127.0.0.1:9"}  # fmt: skip
    done = run_cli("check", env=env)
    assert "github-app: key SHA256:" in done.stdout, done.stdout + done.stderr  # the key was read from the file
    both = run_cli("check", env={**env, "GIT_TOKEN_PROXY_PRIVATE_KEY": str(key)})
    assert both.returncode == 2 and "GIT_TOKEN_PROXY_PRIVATE_KEY_FILE" in both.stderr and "keep one" in both.stderr
    inline = run_cli("check", env={**env, "GIT_TOKEN_PROXY_PRIVATE_KEY_FILE": pkcs1_pem(app_key)})
    assert inline.returncode == 2 and "takes a path" in inline.stderr and "MII" not in inline.stderr
    missing = run_cli("check", env={**env, "GIT_TOKEN_PROXY_PRIVATE_KEY_FILE": str(tmp_path / "gone.pem")})
    assert missing.returncode == 2 and "GIT_TOKEN_PROXY_PRIVATE_KEY_FILE (--private-key-file): cannot read" in (
        missing.stderr
    )


def test_an_unknown_variable_is_a_warning_naming_the_closest(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    # The config's own ${GIT_TOKEN_PROXY_CI_TOKEN} is the user's variable, not a typo.
    config.write_text(STATIC + TOKEN_ENTRY + "        token: ${GIT_TOKEN_PROXY_CI_TOKEN}\n")
    env = {**CLEAN, "GIT_TOKEN_PROXY_PRIVATEKEY": "x", "GIT_TOKEN_PROXY_CI_TOKEN": "t", "GIT_TOKEN_PROXY_ZZZ": "1"}
    port = free_port()
    stderr = serve_briefly(["--config", str(config), "--port", str(port), "--log-format", "text"], env, port)
    assert "GIT_TOKEN_PROXY_PRIVATEKEY is not a setting of git-token-proxy" in stderr
    assert "did you mean GIT_TOKEN_PROXY_PRIVATE_KEY?" in stderr
    assert "GIT_TOKEN_PROXY_ZZZ is not a setting" in stderr
    assert "GIT_TOKEN_PROXY_CI_TOKEN is not" not in stderr


def test_healthcheck_with_a_port_needs_no_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC)
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)], env=CLEAN,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as process:  # fmt: skip
        try:
            wait_for_healthz(port)
            done = run_cli("healthcheck", "--port", str(port), env=CLEAN)
            by_variable = run_cli("healthcheck", env={**CLEAN, "GIT_TOKEN_PROXY_PORT": str(port)})
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == f"http://127.0.0.1:{port}/healthz: ok", done.stderr
    assert by_variable.returncode == 0, by_variable.stdout + by_variable.stderr


def test_the_metrics_port_cannot_be_the_git_port(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC + "server:\n  port: 18080\n  metricsPort: 18080\n")
    done = run_cli("serve", "--config", str(config), env=CLEAN)
    assert done.returncode == 2 and "server.metricsPort: 18080 is also the git port" in done.stderr
    config.write_text(STATIC)
    done = run_cli("serve", "--config", str(config), "--port", "18081", "--metrics-port", "18081", env=CLEAN)
    (line,) = done.stderr.splitlines()
    assert done.returncode == 2 and "GIT_TOKEN_PROXY_METRICS_PORT (--metrics-port): 18081 is also the git port" in line


# ---------------------------------------------------------------- the help


def help_of(command: str) -> str:
    done = run_cli(command, "--help", env=CLEAN)
    assert done.returncode == 0
    return done.stdout


def test_each_command_lists_only_its_own_arguments() -> None:
    serve, check, health, demo = (help_of(c) for c in ("serve", "check", "healthcheck", "demo"))
    assert "--watch" in serve and "--private-key PATH|PEM" in serve and "--port PORT" in serve
    assert "--host" not in check and "--port" not in check and "--repo HOST/OWNER/REPO" in check
    assert "--private-key" not in health and "--client-id" not in health and "--timeout SECONDS" in health
    assert "--config" not in demo
    for text in (serve, check, health, demo):
        assert "examples:\n  git-token-proxy " in text
        assert "VALUE" not in text  # every argument says what it takes


def test_a_mistyped_command_gets_a_guess() -> None:
    done = run_cli("serv", env=CLEAN)
    (line,) = done.stderr.splitlines()
    assert done.returncode == 2 and "did you mean 'serve'?" in line


@pytest.mark.parametrize(
    ("text", "says"),
    [("server:\n  prot: 80\n", "server.prot: unknown key; did you mean 'port'?"),
     ("github:\n  appInstallation:\n    auth:\n      - type: github_app_installation\n        urlPattern: x\n"
      "        clientID: Iv1\n        privateKey: /k.pem\n",
      "github.appInstallation.auth[0].clientID: unknown key; did you mean 'clientId'?"),
     ("access:\n  clients:\n    - name: a\n      token: t\n      repo: ['.*']\n",
      "access.clients[0].repo: unknown key; did you mean 'repos'?"),
     ("mirror:\n  dri: /tmp/m\n", "mirror.dri: unknown key; did you mean 'dir'?")],
)  # fmt: skip
def test_a_mistyped_config_key_gets_a_guess(tmp_path: Path, text: str, says: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    done = run_cli("check", "--config", str(config), env=CLEAN)
    assert done.returncode == 2 and says in done.stderr, done.stderr


# ---------------------------------------------------------------- the smaller items


def test_the_start_up_line_counts_one_entry_as_one(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC + TOKEN_ENTRY + "        token: t\n")
    done = run_cli("check", "--config", str(config), env=CLEAN)
    assert "1 auth entry" in done.stdout and "1 auth entries" not in done.stdout


def test_with_access_control_the_start_up_lines_give_the_credential_helper(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC + "access:\n  clients:\n    - name: ci\n      token: a-client-token-0001\n"
                      "      repos: ['.*']\n")  # fmt: skip
    port = free_port()
    stderr = serve_briefly(["--config", str(config), "--port", str(port), "--log-format", "text"], CLEAN, port)
    assert f"git config --global credential.http://127.0.0.1:{port}.helper" in stderr
    assert "~/.git-token-proxy-token" in stderr


def test_a_wrong_client_token_is_not_recognised_rather_than_missing(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(STATIC + "access:\n  clients:\n    - name: ci\n      token: a-client-token-0001\n"
                      "      repos: ['.*']\n")  # fmt: skip
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)], env=CLEAN,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as process:  # fmt: skip
        try:
            wait_for_healthz(port)
            texts = []
            for header in ({}, {"Authorization": "Basic eDp3cm9uZy10b2tlbg=="}):  # x:wrong-token
                url = f"http://127.0.0.1:{port}/github.com/acme/app.git/info/refs?service=git-upload-pack"
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(urllib.request.Request(url, headers=header), timeout=10)
                with refused.value as error:
                    texts.append((error.code, error.read().decode()))
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert texts[0] == (401, "this proxy needs a client token (as the password of HTTP Basic auth)\n")
    assert texts[1][0] == 401 and texts[1][1].startswith("client token not recognised")


def test_the_metrics_port_flag_works_with_a_file_too(tmp_path: Path) -> None:
    """--metrics-port over a file's server section, as --port is (it used to be ignored without a word)."""
    config = tmp_path / "config.yaml"
    config.write_text(STATIC)
    port, metrics_port = free_port(), free_port()
    args = ["--config", str(config), "--port", str(port), "--metrics-port", str(metrics_port)]
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", *args], env=CLEAN, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:  # fmt: skip
        try:
            wait_for_healthz(metrics_port)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                assert b"git_token_proxy_requests_in_flight" in response.read()
        finally:
            process.terminate()
            process.wait(timeout=20)
