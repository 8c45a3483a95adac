"""Grants: a small issuer for small setups and tests (the `grant` and `jwks` commands)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..files import read_regular_file
from .identities import MAX_TOKEN_CHARS, parse_scope_claim

DEFAULT_SCOPE_CLAIM = "git_token_proxy"
MAX_GRANT_TTL = 366 * 86400.0
KEY_FILE_LIMIT = 64 * 1024  # a PEM key is 0.2-3 KiB

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# RFC 7638: the members a thumbprint covers, per key type.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


class GrantError(Exception):
    """A key or an argument that cannot be used; one line for the terminal."""


# ---------------------------------------------------------------- grant and jwks


def grant(
    key_file: Path, *, issuer: str, audience: str, subject: str, ttl: float, scope: str | None = None,
    kid: str | None = None, scope_claim: str = DEFAULT_SCOPE_CLAIM, now: float | None = None,
) -> str:  # fmt: skip
    """A signed JWT: iss, aud, sub, iat, exp, a random jti and, with `scope` (JSON), the scope claim. The
    algorithm follows the key (RS256, ES256/384/512, EdDSA); the kid defaults to the key's RFC 7638 thumbprint,
    as `jwks` publishes it."""
    for name, value in (("--issuer", issuer), ("--audience", audience), ("--sub", subject)):
        if not value.strip():
            raise GrantError(f"{name} is empty")
    if not 0 < ttl <= MAX_GRANT_TTL:
        raise GrantError("--ttl must be longer than zero and at most 366 days (short lifetimes are the point)")
    key = _signing_key(load_key(key_file))
    algorithm = signing_algorithm(key)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer, "aud": audience, "sub": subject,
        "iat": issued, "exp": issued + int(ttl), "jti": secrets.token_urlsafe(16),
    }  # fmt: skip
    if scope is not None:
        claims[scope_claim] = _scope(scope)
    header = {"kid": kid or thumbprint(public_jwk(key.public_key())), "typ": "JWT"}
    token = jwt.encode(claims, key, algorithm=algorithm, headers=header)
    if len(token) > MAX_TOKEN_CHARS:
        raise GrantError(
            f"the token would be over {MAX_TOKEN_CHARS // 1024} KiB, which the proxy refuses: a smaller --scope"
        )
    return token


def jwks_document(key_file: Path, kid: str | None = None) -> dict[str, list[dict[str, str]]]:
    """The JWKS for the public half of `key_file` (a private or a public PEM): what the proxy's jwksFile holds. The
    kid defaults to the thumbprint, as `grant` does; give both the same `kid` or neither."""
    loaded = load_key(key_file)
    public = loaded.public_key() if isinstance(loaded, SigningKey) else loaded
    jwk = public_jwk(public)
    return {"keys": [{**jwk, "kid": kid or thumbprint(jwk), "alg": signing_algorithm(public), "use": "sig"}]}


def load_key(path: Path) -> SigningKey | PublicKey:
    try:
        data = read_regular_file(path, KEY_FILE_LIMIT)
    except (OSError, ValueError) as error:
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
        raise GrantError(f"{path}: cannot read: {reason}") from None
    try:
        key: Any = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise GrantError(f"{path} is encrypted: give an unencrypted key (openssl pkey -in KEY -out PLAIN)") from None
    except (ValueError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise GrantError(f"{path} is not a PEM key (a PRIVATE KEY or PUBLIC KEY block)") from None
    if not isinstance(key, SigningKey | PublicKey):
        raise GrantError(f"{path}: an {type(key).__name__}; use an EC (P-256), Ed25519 or RSA (2048+) key")
    signing_algorithm(key)  # refuse a small RSA key or another curve now, with the reason
    return key


def _signing_key(key: SigningKey | PublicKey) -> SigningKey:
    if not isinstance(key, SigningKey):
        raise GrantError("the key is a public key: grant signs with the private key")
    return key


def signing_algorithm(key: SigningKey | PublicKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise GrantError(f"an RSA key of {key.key_size} bits: the proxy accepts 2048 bits and more")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_ALGORITHMS:
            raise GrantError(f"an EC key on {key.curve.name}: use P-256, P-384 or P-521")
        return _EC_ALGORITHMS[key.curve.name]
    return "EdDSA"


def public_jwk(key: PublicKey) -> dict[str, str]:
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    return {name: str(value) for name, value in jwk.items() if name in ("kty", "crv", "n", "e", "x", "y")}


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, in lexicographic order, as JSON without whitespace."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _scope(text: str) -> object:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise GrantError(
            '--scope is not JSON; e.g. \'{"repos": ["github\\\\.com/acme/app"], "readOnly": true}\''
        ) from None
    try:
        parse_scope_claim(value)  # the proxy's own check: a scope it would refuse is refused here
    except ValueError as error:
        raise GrantError(f"--scope: {error}") from None
    return value
