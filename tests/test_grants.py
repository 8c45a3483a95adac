"""Grants: tokens `grant` signs verify against the JWKS `jwks` prints, and the credential helper answers the real
git CLI with the token file's current content, or stops it without a prompt."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.access.grants import GrantError, grant, jwks_document, thumbprint
from proxy.access.identities import VerifiedIdentity, build_verifier
from proxy.access.jwks import KeyRegistry
from proxy.config.issuers import IssuerConfig
from proxy.credential_helper import HELPER_USERNAME, TokenFileProblem, credential_helper, read_token
from proxy.errors import TokenRefused
from proxy.testing import git_env
from proxy.testing.gitcli import PROMPT_MARKERS

ISSUER = "https://orchestrator.internal"


def write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def verify_with_jwks(tmp_path: Path, key_file: Path, token: str, **overrides: object) -> VerifiedIdentity:
    """The proxy's own verification, with the JWKS `jwks` printed as its jwksFile."""
    jwks = tmp_path / "issuer.jwks.json"
    jwks.write_text(json.dumps(jwks_document(key_file)))
    config = IssuerConfig.model_validate({
        "name": "orchestrator", "issuer": ISSUER, "audience": "git-token-proxy", "jwksFile": str(jwks),
        "repos": [r"github\.com/acme/.*"], "algorithms": ["ES256", "ES384", "RS256", "EdDSA"], **overrides,
    })  # fmt: skip
    return asyncio.run(build_verifier([config], (), KeyRegistry()).verify(token))


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
)
def test_a_grant_verifies_against_the_printed_jwks(tmp_path: Path, key: object, algorithm: str) -> None:
    key_file = write_key(tmp_path / "key.pem", key)  # type: ignore[arg-type]
    token = grant(key_file, issuer=ISSUER, audience="git-token-proxy", subject="sandbox-9", ttl=7200)
    header = jwt.get_unverified_header(token)
    published = jwks_document(key_file)["keys"][0]
    assert header["alg"] == algorithm == published["alg"] and header["kid"] == published["kid"]
    assert published["use"] == "sig" and "d" not in published
    identity = verify_with_jwks(tmp_path, key_file, token)
    assert identity.subject == identity.client == "sandbox-9"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 7200 and len(claims["jti"]) >= 16


def test_a_scoped_grant_narrows(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key.pem", ec.generate_private_key(ec.SECP256R1()))
    scope = '{"repos": ["github\\\\.com/acme/app"], "readOnly": true}'
    token = grant(key_file, issuer=ISSUER, audience="git-token-proxy", subject="s", ttl=600, scope=scope)
    identity = verify_with_jwks(tmp_path, key_file, token, scopeClaim="git_token_proxy")
    assert identity.scope.read_only and identity.scope.allows_repo("github.com/acme/app")
    assert not identity.scope.allows_repo("github.com/acme/other")


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("{", "--scope is not JSON"),
        ('{"repos": "x"}', "--scope: repos: Input should be a valid list"),
        ('{"readOnly": "yes"}', "--scope: readOnly"),
        ('{"write": true}', "--scope: write: Extra inputs are not permitted"),
        ('["x"]', "--scope: the claim"),
    ],
)
def test_a_scope_the_proxy_would_refuse_is_refused(tmp_path: Path, scope: str, message: str) -> None:
    key_file = write_key(tmp_path / "key.pem", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(GrantError, match="^" + message.replace("[", r"\[")):
        grant(key_file, issuer=ISSUER, audience="a", subject="s", ttl=600, scope=scope)


def test_grant_arguments_and_keys(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key.pem", ec.generate_private_key(ec.SECP256R1()))
    for ttl in (0, -5, 400 * 86400):
        with pytest.raises(GrantError, match="--ttl"):
            grant(key_file, issuer=ISSUER, audience="a", subject="s", ttl=ttl)
    with pytest.raises(GrantError, match="--sub is empty"):
        grant(key_file, issuer=ISSUER, audience="a", subject=" ", ttl=60)
    small = write_key(tmp_path / "small.pem", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(GrantError, match="1024 bits"):
        grant(small, issuer=ISSUER, audience="a", subject="s", ttl=60)
    k1 = write_key(tmp_path / "k1.pem", ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(GrantError, match="secp256k1"):
        jwks_document(k1)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(GrantError, match="is encrypted"):
        grant(encrypted, issuer=ISSUER, audience="a", subject="s", ttl=60)
    (tmp_path / "not-a-key.pem").write_text("hello")
    with pytest.raises(GrantError, match="is not a PEM key"):
        jwks_document(tmp_path / "not-a-key.pem")
    with pytest.raises(GrantError, match="cannot read"):
        jwks_document(tmp_path / "missing.pem")


def test_jwks_from_the_public_key_is_the_same(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private_file = write_key(tmp_path / "key.pem", key)
    public_file = tmp_path / "key.pub.pem"
    public_file.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert jwks_document(public_file) == jwks_document(private_file)
    with pytest.raises(GrantError, match="is a public key"):
        grant(public_file, issuer=ISSUER, audience="a", subject="s", ttl=60)


def test_a_kid_of_ones_own(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key.pem", ec.generate_private_key(ec.SECP256R1()))
    token = grant(key_file, issuer=ISSUER, audience="git-token-proxy", subject="s", ttl=600, kid="2024-key")
    assert jwt.get_unverified_header(token)["kid"] == "2024-key"
    assert jwks_document(key_file, kid="2024-key")["keys"][0]["kid"] == "2024-key"


def test_the_rfc_7638_thumbprint() -> None:
    """The example of RFC 7638, section 3.1."""
    modulus = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdA"
        "ZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-"
        "kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29", "n": modulus}
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_an_expired_grant_is_refused_by_the_proxy(tmp_path: Path) -> None:
    key_file = write_key(tmp_path / "key.pem", ec.generate_private_key(ec.SECP256R1()))
    token = grant(key_file, issuer=ISSUER, audience="git-token-proxy", subject="s", ttl=600, now=time.time() - 900)
    with pytest.raises(TokenRefused, match=r"^token expired 5 min ago$"):
        verify_with_jwks(tmp_path, key_file, token)


# ---------------------------------------------------------------- the credential helper


def helper(
    action: str, token_file: Path, request: str = "protocol=http\nhost=127.0.0.1:8080\n\n"
) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    status = credential_helper(action, token_file, io.StringIO(request), stdout, stderr)
    return status, stdout.getvalue(), stderr.getvalue()


def test_get_answers_with_the_files_token_read_each_time(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a.b.c")  # as the kubelet writes it: no newline
    assert helper("get", token_file) == (0, f"username={HELPER_USERNAME}\npassword=a.b.c\n", "")
    token_file.write_text("d.e.f\n")  # rotated in place
    assert helper("get", token_file)[1].endswith("password=d.e.f\n")


@pytest.mark.parametrize("action", ["store", "erase", "capabilities", "unknown"])
def test_other_actions_do_nothing(tmp_path: Path, action: str) -> None:
    assert helper(action, tmp_path / "missing", "username=x\npassword=y\n\n") == (0, "", "")


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read token file"), (b"", "is empty"), (b"  \n", "is empty"), (b"a.b.c\nx.y.z\n", "more than one"),
     (b"a b", "more than one"), (b"\xff\xfe", "not ASCII"), (b"a\x1bb", "more than one")],
)  # fmt: skip
def test_without_a_usable_token_git_is_told_to_quit(tmp_path: Path, content: bytes | None, problem: str) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_bytes(content)
    status, stdout, stderr = helper("get", token_file)
    assert (status, stdout) == (1, "quit=1\n")
    assert stderr.startswith("git-token-proxy credential-helper: ") and problem in stderr and stderr.count("\n") == 1


def test_read_token_refuses_a_fifo_and_a_huge_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TokenFileProblem, match="a FIFO"):
        read_token(tmp_path / "fifo")
    (tmp_path / "huge").write_bytes(b"x" * (1 << 20))
    with pytest.raises(TokenFileProblem, match="larger than"):
        read_token(tmp_path / "huge")


def git_credential_fill(tmp_path: Path, token_file: Path) -> tuple[int, str, str]:
    helper_command = f"!'{sys.executable}' -m proxy credential-helper --token-file '{token_file}'"
    config = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "credential.helper", "GIT_CONFIG_VALUE_0": helper_command}
    env = git_env(tmp_path / "home", {**config, "PYTHONPATH": str(Path(__file__).parent.parent)})
    done = subprocess.run(
        ["git", "credential", "fill"], input="protocol=http\nhost=127.0.0.1:8080\npath=github.com/acme/app.git\n\n",
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_real_git_gets_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzIn0.c2ln")
    status, stdout, stderr = git_credential_fill(tmp_path, token_file)
    assert status == 0, stderr
    assert (
        f"username={HELPER_USERNAME}\n" in stdout and "password=eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzIn0.c2ln\n" in stdout
    )
    token_file.write_text("eyJ.rotated.token")
    assert "password=eyJ.rotated.token\n" in git_credential_fill(tmp_path, token_file)[1]


def test_real_git_stops_without_a_prompt_when_the_file_is_missing(tmp_path: Path) -> None:
    status, stdout, stderr = git_credential_fill(tmp_path, tmp_path / "not-yet-written")
    assert status == 128 and stdout == ""
    assert "git-token-proxy credential-helper: cannot read token file" in stderr
    assert "told us to quit" in stderr
    assert not any(marker in stderr for marker in PROMPT_MARKERS)
