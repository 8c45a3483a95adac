"""Healthcheck: which address it asks, and how it recognises the `serve` it is asking about."""

from __future__ import annotations

import pytest

from proxy.cli import _parser
from proxy.config import environment as env_config
from proxy.healthcheck import probe_url, serve_argv_of


@pytest.mark.parametrize(
    ("cmdline", "argv"),
    [(b"/usr/local/bin/python\0/usr/local/bin/git-token-proxy\0serve\0--port\x009000\0", ["--port", "9000"]),
     (b"/sbin/tini\0--\0git-token-proxy\0serve\0", []),
     (b"python3\0-m\0proxy\0serve\0--config\0/etc/c.yaml\0", ["--config", "/etc/c.yaml"]),
     (b"/usr/lib/systemd/systemd\0--system\0", None),
     (b"git-token-proxy\0check\0", None)],
)  # fmt: skip
def test_the_serve_command_line_of_pid_1_is_recognised(cmdline: bytes, argv: list[str] | None) -> None:
    assert serve_argv_of(cmdline) == argv


@pytest.mark.parametrize(
    ("args", "environ", "url"),
    [(["--port", "9000"], {}, "http://127.0.0.1:9000/healthz"),
     (["--host", "::1", "--port", "9000"], {}, "http://[::1]:9000/healthz"),
     ([], {"GIT_TOKEN_PROXY_METRICS_PORT": "9090", "GIT_TOKEN_PROXY_METRICS_HOST": "::"},
      "http://[::1]:9090/healthz")],
)  # fmt: skip
def test_the_probe_asks_where_serve_listens(args: list[str], environ: dict[str, str], url: str) -> None:
    environ = {"GIT_TOKEN_PROXY_CLIENT_ID": "Iv1", "GIT_TOKEN_PROXY_PRIVATE_KEY": "/k.pem", **environ}
    loaded = env_config.load(_parser().parse_args(["serve", *args]), environ)
    assert probe_url(loaded, ready=False) == url
