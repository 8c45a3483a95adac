"""Lazy imports: `serve` with static tokens loads neither the GitHub App stack, nor redis, nor any test code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.testing import pkcs1_pem
from proxy.testing.process import free_port
from tests.support import static_config

ROOT = Path(__file__).parent.parent

# `git-token-proxy serve`, then the names of the modules it loaded, once it has stopped.
SERVE_THEN_LIST_MODULES = """
import sys
from proxy.cli import main

status = main(sys.argv[2:])
with open(sys.argv[1], "w") as listing:
    listing.write("\\n".join(sorted(sys.modules)))
sys.exit(status)
"""

# Each costs every proxy that loads it RSS (cryptography's Rust core alone about 7 MiB); only app entries use the
# first ones, only cache.redis the redis ones, and only mirror.dir the mirror package.
NOT_FOR_STATIC_TOKENS = [
    "cryptography",
    "jwt",
    "proxy.credentials.answers",
    "proxy.credentials.github_api",
    "proxy.credentials.github_app",
    "aiocache",
    "redis",
    "proxy.credentials.redis_store",
    "proxy.mirror",
    "aiobotocore",  # mirror.snapshots only
    "botocore",
    "proxy.push.gate",  # push policies only
    "aiolimiter",
    "proxy.access.identities",  # access.issuers only
    "proxy.access.jwks",
]
# Test fakes, the demo, `check` and the test tools: never part of a running proxy, whatever its config.
NEVER_SERVED = ["proxy.testing", "proxy.demo", "proxy.check", "hypothesis", "kubernetes_validate", "pytest"]


def modules_loaded_by_serve(tmp_path: Path, config: dict[str, Any], request: tuple[str, int] | None = None) -> set[str]:
    """Runs `serve` for `config` until it answers (and has answered `request`, a path and the status it must get,
    if given), stops it with SIGTERM, and returns every module it loaded on the way."""
    config_file, listing = tmp_path / "config.yaml", tmp_path / "modules.txt"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        sys.executable, "-c", SERVE_THEN_LIST_MODULES, str(listing),
        "serve", "--config", str(config_file), "--port", str(port),
    ]  # fmt: skip
    # PYTHONPATH: this tree's package, installed or not.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            status_of(port, "/healthz", deadline=time.monotonic() + 20)
            if request is not None:
                path, status = request
                assert status_of(port, path, deadline=time.monotonic() + 20) == status
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            process.kill()
        stderr = process.stderr.read() if process.stderr else ""
    assert "Traceback" not in stderr, stderr
    return set(listing.read_text().split())


def status_of(port: int, path: str, deadline: float) -> int:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            error.close()
            return error.code
        except OSError:
            assert time.monotonic() < deadline, f"serve did not answer {path}"
            time.sleep(0.1)


def test_serve_with_static_tokens_loads_no_app_stack_redis_or_test_code(tmp_path: Path) -> None:
    # 127.0.0.1:9 refuses at once: the request finds its route and token, then fails upstream (502), offline.
    config = static_config("http://127.0.0.1:9")
    request = ("/github.com/acme/app.git/info/refs?service=git-upload-pack", 502)
    loaded = modules_loaded_by_serve(tmp_path, config, request)
    assert "proxy.forward" in loaded  # the listing is the serving process's
    assert sorted(loaded & {*NOT_FOR_STATIC_TOKENS, *NEVER_SERVED}) == []


def test_serve_with_an_app_entry_loads_the_app_stack_at_start_up(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> None:
    """Lazy, not missing: an app entry gets its key parsed and PyJWT imported before serving, not on a request."""
    key_file = tmp_path / "app.pem"
    key_file.write_text(pkcs1_pem(app_key))
    config = static_config("http://127.0.0.1:9")
    config["github"]["appInstallation"]["auth"] = [
        {
            "id": "acme-app",
            "type": "GITHUB_APP_INSTALLATION",
            "urlPattern": r"(?<baseUrl>github\.com)/acme/.*",
            "clientId": "Iv1.lazy",
            "privateKey": str(key_file),
        }
    ]
    loaded = modules_loaded_by_serve(tmp_path, config)
    assert {"cryptography", "jwt", "proxy.credentials.github_app"} <= loaded
    assert sorted(loaded & set(NEVER_SERVED)) == []
