"""The signed-identity examples hold configs the proxy loads, and the pieces fit: the sandbox's token volume has
the audience the issuer requires, and git's helper reads the file that volume holds."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from proxy.config import parse_config
from proxy.testing.issuer import generate_key

ROOT = Path(__file__).parent.parent


def _documents(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_identities_example_fits_together(tmp_path: Path) -> None:
    config_map, daemonset, service, sandbox = _documents(ROOT / "examples" / "kubernetes" / "identities.yaml")
    raw = yaml.safe_load(config_map["data"]["config.yaml"])
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [generate_key("ES256").public_jwk()]}))
    raw["access"]["issuers"][0]["jwksFile"] = str(jwks)
    key = tmp_path / "key.pem"
    key.write_text("placeholder")  # read when the app is built, not by the loader
    raw["github"]["appInstallation"]["auth"][0]["privateKey"] = str(key)
    config = parse_config(raw, "identities example")
    (issuer,) = config.access.issuers
    assert issuer.push is not None and "{client}" in issuer.push.refs[0]
    (volume,) = sandbox["spec"]["volumes"]
    (projected,) = volume["projected"]["sources"]
    assert projected["serviceAccountToken"]["audience"] == issuer.audience
    (agent,) = sandbox["spec"]["containers"]
    helper = next(e["value"] for e in agent["env"] if e["name"] == "GIT_CONFIG_VALUE_1")
    mount = agent["volumeMounts"][0]["mountPath"]
    assert f"{mount}/{projected['serviceAccountToken']['path']}" in helper
    assert service["spec"]["internalTrafficPolicy"] == "Local" and daemonset["kind"] == "DaemonSet"


def test_github_actions_example_config_loads() -> None:
    raw = yaml.safe_load((ROOT / "examples" / "github-actions" / "proxy-config.yaml").read_text())
    config = parse_config(raw, "actions example")
    (issuer,) = config.access.issuers
    assert issuer.issuer == "https://token.actions.githubusercontent.com" and issuer.jwks_file is None
    workflow = yaml.safe_load((ROOT / "examples" / "github-actions" / "workflow.yaml").read_text())
    assert workflow["permissions"]["id-token"] == "write"
    assert "audience=git-token-proxy" in workflow["jobs"]["work"]["steps"][0]["run"]
