"""Identities under hypothesis: whatever a token holds (even correctly signed), verification ends in an identity or
a 401 reason, never another exception; and a scope claim never widens its issuer's scope."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.access.identities import IdentityVerifier, VerifiedIdentity, build_verifier
from proxy.access.jwks import KeyRegistry
from proxy.config.issuers import IssuerConfig
from proxy.errors import TokenRefused
from proxy.routing import compile_repo_pattern
from proxy.testing.issuer import TestIssuer, sign

T = TypeVar("T")
ISSUER = TestIssuer(("ES256", "RS256"))  # never started: its keys go to a jwksFile
ISSUER.url = "https://issuer.example"
ACME = r"github\.com/acme/.*"
ISSUER_PUSH = {"refs": ["refs/heads/agent/{client}/**"]}
REPOS = ["github.com/acme/app", "github.com/acme/tools", "github.com/other/app", "gitlab.com/x/y", "github.com/acme"]


def _verifier() -> IdentityVerifier:
    jwks = Path(tempfile.mkdtemp(prefix="identities-fuzz-")) / "issuer.jwks.json"
    jwks.write_bytes(ISSUER.jwks_bytes())
    config = IssuerConfig.model_validate({
        "name": "fuzz", "issuer": ISSUER.url, "audience": "git-token-proxy", "jwksFile": str(jwks), "repos": [ACME],
        "scopeClaim": "gtp", "push": ISSUER_PUSH, "claims": {"repository_owner": {"pattern": "acme.*"}},
    })  # fmt: skip
    return build_verifier([config], ("revoked",), KeyRegistry())


VERIFIER = _verifier()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Keys from a file: verification never waits on anything, so the coroutine ends on its first step."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("verification waited for something")


def verify(token: str) -> VerifiedIdentity | None:
    try:
        return run(VERIFIER.verify(token))
    except TokenRefused as refused:
        reason = str(refused)
        assert reason and "\n" not in reason and len(reason) < 400
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CLAIM_NAMES = ["exp", "iat", "nbf", "aud", "iss", "sub", "jti", "gtp", "repository_owner", "x"]
HEADER_NAMES = ["kid", "typ", "crit", "b64", "jku", "jwk", "x5c", "cty", "zip", "alg"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_=-]{0,60}\.[A-Za-z0-9_=-]{0,60}\.[A-Za-z0-9_=-]{0,60}"))
def test_any_text_is_refused_with_a_reason(token: str) -> None:
    assert verify(token) is None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(CLAIM_NAMES), json_values, max_size=5),
    st.dictionaries(st.sampled_from(HEADER_NAMES), json_values, max_size=3),
    st.sampled_from(["ES256", "RS256"]),
)
def test_signed_tokens_with_any_claims_and_headers(
    claims: dict[str, Any], headers: dict[str, Any], algorithm: str
) -> None:
    key = ISSUER.key(algorithm)
    all_claims = {**ISSUER.claims(extra_claims={"repository_owner": "acme"}), **claims}
    token = sign({"alg": algorithm, "kid": key.kid, **headers}, all_claims, key)
    identity = verify(token)
    if identity is not None:
        for repo in REPOS:
            assert not identity.scope.allows_repo(repo) or compile_repo_pattern("t", ACME).fullmatch(repo)
        assert identity.scope.push[0].config.refs == ISSUER_PUSH["refs"]


repo_patterns = st.lists(
    st.sampled_from([ACME, r"github\.com/acme/app", ".*", r"github\.com/other/.*", "x", r"github\.com", "gitlab.*"]),
    max_size=4,
)
scope_claims = st.fixed_dictionaries(
    {},
    optional={
        "repos": repo_patterns,
        "readOnly": st.booleans(),
        "push": st.fixed_dictionaries(
            {"refs": st.lists(st.sampled_from(["refs/heads/a/**", "refs/tags/*"]), min_size=1)}
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(scope_claims)
def test_a_scope_claim_only_narrows(claim: dict[str, Any]) -> None:
    token = ISSUER.mint(extra_claims={"gtp": claim, "repository_owner": "acme-labs"})
    identity = verify(token)
    assert identity is not None, json.dumps(claim)
    issuer_allows = compile_repo_pattern("issuer", ACME)
    claimed = [compile_repo_pattern("claim", pattern) for pattern in claim.get("repos", [".*"])]
    for repo in REPOS:
        expected = bool(issuer_allows.fullmatch(repo)) and any(pattern.fullmatch(repo) for pattern in claimed)
        assert identity.scope.allows_repo(repo) == expected, repo
    assert identity.scope.read_only == claim.get("readOnly", False)
    expected = [ISSUER_PUSH["refs"], *([claim["push"]["refs"]] if "push" in claim else [])]
    assert [policy.config.refs for policy in identity.scope.push] == expected
