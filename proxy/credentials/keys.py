"""App private keys: read once at start-up, in any form people paste them, and known in logs only by fingerprint."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError
from ..files import read_regular_file
from ..pem import base64_pem, key_file_of, normalise_pem

# cryptography is imported where a key is parsed, not here: its Rust core costs a process about 7 MiB of RSS, and a
# config with static tokens only (which `serve` and `check` import this module for) never parses a key.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["AppKey", "fingerprint_of", "key_file_of", "load_app_key", "normalise_pem"]

MAX_KEY_FILE = 64 * 1024  # a 4096-bit PEM is about 3.3 KiB; anything much larger is not a key


@dataclass(frozen=True, repr=False)
class AppKey:
    key: rsa.RSAPrivateKey
    fingerprint: str  # SHA256:<base64> of the public key, as `ssh-keygen -lf` prints; safe to log

    def __repr__(self) -> str:
        return f"AppKey({self.fingerprint})"


def load_app_key(entry_id: str, value: str) -> AppKey:
    """`value` is the PEM itself, the PEM base64-encoded (as Kubernetes Secrets hold it), or a path to a file."""
    if "-----BEGIN" in value:
        source, pem = "inline privateKey", normalise_pem(value)
    elif (decoded := base64_pem(value)) is not None:
        source, pem = "inline base64 privateKey", normalise_pem(decoded)
    else:
        source, pem = _read_key_file(entry_id, value)
    key = _parse_private_key(entry_id, source, pem)
    return AppKey(key, fingerprint_of(key))


def _read_key_file(entry_id: str, value: str) -> tuple[str, bytes]:
    text = value.strip()
    if not text:
        raise ConfigError(f"auth entry {entry_id!r}: privateKey is empty (is the environment variable set?)")
    # Only something shaped like a path is ever repeated in a message: a mangled key must not end up in a log.
    if len(text) > 255 or not re.fullmatch(r"[\w./~@+:-]+", text):
        raise ConfigError(
            f"auth entry {entry_id!r}: privateKey is neither a PEM (-----BEGIN ... PRIVATE KEY-----), "
            "a base64-encoded PEM, nor a file path"
        )
    path = Path(text).expanduser().absolute()  # the full path in messages: which folder was it looked up in?
    try:
        return str(path), normalise_pem(read_regular_file(path, MAX_KEY_FILE).decode())
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not a text PEM file"
        raise ConfigError(f"auth entry {entry_id!r}: cannot read privateKey file {path}: {reason}") from None


def _parse_private_key(entry_id: str, source: str, pem: bytes) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    where = f"auth entry {entry_id!r}: privateKey ({source})"
    if b"PUBLIC KEY-----" in pem or pem.startswith(b"ssh-rsa "):
        raise ConfigError(f"{where} is a public key; GitHub Apps sign with the private key (.pem from the app page)")
    key: object
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in pem:
            key = serialization.load_ssh_private_key(pem, password=None)
        else:
            key = serialization.load_pem_private_key(pem, password=None)  # PKCS#1 and PKCS#8
    except (ValueError, TypeError) as error:
        # Never echo the key material: only say what is wrong with it.
        reason = (
            "it is encrypted; give an unencrypted key"
            if "encrypted" in str(error).lower()
            else "truncated or not a PEM private key"
        )
        raise ConfigError(f"{where} cannot be parsed: {reason}") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm and friends for odd inputs
        raise ConfigError(f"{where} cannot be parsed: unsupported key format") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{where} is not an RSA key; GitHub Apps use RS256")
    return key


def fingerprint_of(key: rsa.RSAPrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")
