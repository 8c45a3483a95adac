"""The snapshots example for Kubernetes holds a config the proxy loads, and its pieces fit: the mirror directory is a
writable mount of a volume large enough, the job runs as the ServiceAccount whose IRSA role reaches the bucket,
no AWS key is anywhere, and the build's git goes through the sidecar's port."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from proxy.config import parse_config

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "kubernetes" / "snapshots.yaml"
_QUANTITY = re.compile(r"([0-9]+)(Ki|Mi|Gi|Ti)")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def quantity_bytes(value: str) -> int:
    """A Kubernetes quantity with a binary suffix (the only kind the example uses)."""
    match = _QUANTITY.fullmatch(value)
    assert match is not None, value
    return int(match.group(1)) << (10 * ("KiMiGiTi".index(match.group(2)) // 2 + 1))


def test_the_snapshots_example_fits_together() -> None:
    account, config_map, job = documents(EXAMPLE)
    assert [account["kind"], config_map["kind"], job["kind"]] == ["ServiceAccount", "ConfigMap", "Job"]
    text = config_map["data"]["config.yaml"]
    config = parse_config(yaml.safe_load(text), "snapshots example")
    assert config.mirror is not None and config.mirror.snapshots is not None
    snapshots = config.mirror.snapshots
    assert (snapshots.bucket, snapshots.prefix, snapshots.publish) == ("build-cache", "git-token-proxy", True)

    spec = job["spec"]["template"]["spec"]
    # IRSA: the pod runs as the ServiceAccount that carries the role; the role's policy names the same bucket/prefix.
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(r"arn:aws:iam::[0-9]{12}:role/[\w+=,.@-]+",
                        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])  # fmt: skip
    assert f"arn:aws:s3:::{snapshots.bucket}/{snapshots.prefix}/*" in EXAMPLE.read_text()

    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    # The mirror directory: a writable mount of an emptyDir that holds maxSize and more (a fill, a bundle).
    mounts = {mount["mountPath"]: mount for mount in sidecar["volumeMounts"]}
    mirror_mount = mounts[str(config.mirror.dir)]
    assert not mirror_mount.get("readOnly")
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert quantity_bytes(volumes[mirror_mount["name"]]["emptyDir"]["sizeLimit"]) > config.mirror.max_size
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True  # the mirror volume is all it writes
    assert mounts["/etc/git-token-proxy"]["readOnly"] and sidecar["args"][-1] == "/etc/git-token-proxy/config.yaml"

    # Credentials come from the AWS chain (IRSA): none in the config, none in any container's environment.
    assert not re.search(r"(?i)access.?key|secret.?key|session.?token", text)
    for container in [*spec["initContainers"], *spec["containers"]]:
        assert not {item["name"] for item in container.get("env", [])} & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

    # The build's git reaches GitHub through the sidecar's port; the sidecar's image is the `mirror` target.
    (build,) = spec["containers"]
    env = {item["name"]: item["value"] for item in build["env"]}
    assert env["GIT_CONFIG_KEY_0"] == f"url.http://127.0.0.1:{config.server.port}/github.com/.insteadOf"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "AS mirror" in dockerfile and ".[snapshots]" in dockerfile
