"""CLI: `check` prints the entries; a broken config exits non-zero with a message naming the key, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
