"""Packaging: the Dockerfile lints, and the Kubernetes and Compose examples are valid and hold a valid config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config

ROOT = Path(__file__).parent.parent


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text and "EXPOSE 8080" in text
    assert 'CMD ["serve", "--config", "/etc/git-token-proxy/config.yaml"]' in text


def test_kubernetes_sidecar_example() -> None:
    config_map, pod = documents(ROOT / "examples" / "kubernetes" / "sidecar.yaml")
    parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), "sidecar config")
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"] for m in sidecar["volumeMounts"]}
    assert {"config", "github-app-key"} <= mounts
    (agent,) = pod["spec"]["containers"]
    env = {item["name"]: item["value"] for item in agent["env"]}
    assert env["GIT_CONFIG_COUNT"] == "1"
    assert env["GIT_CONFIG_KEY_0"] == "url.http://127.0.0.1:8080/github.com/.insteadOf"
    assert env["GIT_CONFIG_VALUE_0"] == "https://github.com/"


def test_kubernetes_fleet_example(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.fernet import Fernet

    config_map, redis, service, agents = documents(ROOT / "examples" / "kubernetes" / "fleet.yaml")
    monkeypatch.setenv("TOKEN_CACHE_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("REDIS_PASSWORD", "example-password")
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), "fleet config")
    assert config.cache.redis is not None and config.cache.redis.url.endswith("@git-token-proxy-redis:6379/0")
    assert service["spec"]["selector"] == redis["spec"]["template"]["metadata"]["labels"]
    (sidecar,) = agents["spec"]["template"]["spec"]["initContainers"]
    assert {env["name"] for env in sidecar["env"]} == {"TOKEN_CACHE_KEY", "REDIS_PASSWORD"}


def test_compose_example(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.fernet import Fernet

    monkeypatch.setenv("TOKEN_CACHE_KEY", Fernet.generate_key().decode())
    (compose,) = documents(ROOT / "examples" / "docker-compose.yaml")
    proxy, agent = compose["services"]["git-token-proxy"], compose["services"]["agent"]
    assert proxy["read_only"] is True
    assert agent["network_mode"] == "service:git-token-proxy"
    assert agent["depends_on"]["git-token-proxy"]["condition"] == "service_healthy"
    content = compose["configs"]["proxy-config"]["content"].replace("$$", "$")  # compose's own escape
    config = parse_config(yaml.safe_load(content), "compose config")
    assert config.cache.redis is not None and "redis" in compose["services"]
