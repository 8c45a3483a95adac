"""App keys: every format people paste, and errors that name the entry and file without echoing key material."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from proxy.config import ConfigError
from proxy.credentials.keys import fingerprint_of, load_app_key, normalise_pem
from proxy.testing import openssh_pem, pkcs1_pem, pkcs8_pem, public_pem


@pytest.mark.parametrize("encode", [pkcs1_pem, pkcs8_pem, openssh_pem])
def test_formats_from_a_file(app_key: rsa.RSAPrivateKey, tmp_path: Path, encode: object) -> None:
    path = tmp_path / "key.pem"
    path.write_text(encode(app_key))  # type: ignore[operator]
    loaded = load_app_key("acme", str(path))
    assert loaded.key.private_numbers() == app_key.private_numbers()
    assert loaded.fingerprint == fingerprint_of(app_key)
    assert loaded.fingerprint.startswith("SHA256:") and "PRIVATE" not in repr(loaded)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda pem: pem.replace("\n", "\\n"),  # one-line env var
        lambda pem: pem.replace("\n", "\r\n"),  # Windows editor
        lambda pem: f'"{pem}"',  # quoted
        lambda pem: "\n".join("    " + line for line in pem.splitlines()),  # YAML block indentation
        lambda pem: "  " + pem.replace("\n", "\\r\\n") + "  ",
    ],
)
def test_pasted_keys_are_normalised(app_key: rsa.RSAPrivateKey, mangle: object) -> None:
    loaded = load_app_key("acme", mangle(pkcs1_pem(app_key)))  # type: ignore[operator]
    assert loaded.key.private_numbers() == app_key.private_numbers()


def test_normalise_pem_is_stable(app_key: rsa.RSAPrivateKey) -> None:
    pem = pkcs8_pem(app_key)
    assert normalise_pem(pem) == pem.encode()


def test_public_key_is_refused_by_name(app_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    path.write_text(public_pem(app_key))
    with pytest.raises(ConfigError, match=rf"'acme'.*{path}.*is a public key"):
        load_app_key("acme", str(path))


def test_truncated_key_is_refused_without_echoing_it(app_key: rsa.RSAPrivateKey) -> None:
    pem = pkcs1_pem(app_key)
    truncated = pem[: len(pem) // 2] + "\n-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(ConfigError, match=r"'acme'.*cannot be parsed") as error:
        load_app_key("acme", truncated)
    assert pem.splitlines()[1] not in str(error.value)


def test_missing_file_names_entry_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"'acme'.*cannot read privateKey file {tmp_path}/nope.pem"):
        load_app_key("acme", str(tmp_path / "nope.pem"))


def test_non_rsa_key_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(ConfigError, match="not an RSA key"):
        load_app_key("acme", pem.decode())


def test_base64_encoded_pem_is_accepted(app_key: rsa.RSAPrivateKey) -> None:
    import base64

    encoded = base64.b64encode(pkcs1_pem(app_key).encode()).decode()
    assert load_app_key("acme", encoded).key.private_numbers() == app_key.private_numbers()


def test_key_material_that_is_not_a_path_is_never_echoed(app_key: rsa.RSAPrivateKey) -> None:
    body = "".join(pkcs1_pem(app_key).splitlines()[1:-1])  # the PEM without its armour lines
    with pytest.raises(ConfigError, match="neither a PEM") as error:
        load_app_key("acme", body[:300] + " " + body[300:])
    assert body[:40] not in str(error.value)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_key_files_must_be_regular_files(tmp_path: Path, kind: str) -> None:
    import os

    if kind == "fifo":
        path = tmp_path / "key.pem"
        os.mkfifo(path)  # nobody writes: opening it for reading would wait for ever
    elif kind == "dev-zero":
        path = Path("/dev/zero")  # endless: reading it whole would fill memory
    else:
        path = tmp_path
    with pytest.raises(ConfigError, match=rf"'acme'.*privateKey file {path}: not a regular file"):
        load_app_key("acme", str(path))


def test_key_files_are_read_with_a_size_cap(app_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "huge.pem"
    path.write_text(pkcs1_pem(app_key) + "#" * (200 * 1024 * 1024 // 1000) * 1000)
    with pytest.raises(ConfigError, match=rf"'acme'.*privateKey file {path}: larger than 64 KiB"):
        load_app_key("acme", str(path))


def test_a_symlinked_key_file_is_read(app_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    """Kubernetes Secret volumes are symlinks to symlinks: the check follows them to the regular file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "key.pem").write_text(pkcs1_pem(app_key))
    (tmp_path / "key.pem").symlink_to(tmp_path / "data" / "key.pem")
    assert load_app_key("acme", str(tmp_path / "key.pem")).fingerprint == fingerprint_of(app_key)
