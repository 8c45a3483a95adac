"""Identities: the issuer config model, and every way a JWT is verified or refused (401 with a one-line reason,
never another exception), against a real issuer serving its JWKS over HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from proxy.access import looks_like_jwt
from proxy.access.clients import bearer_token
from proxy.access.identities import IdentityVerifier, build_verifier, claim_at
from proxy.access.jwks import KeyRegistry
from proxy.config.issuers import IssuerConfig, issuers_problem
from proxy.errors import AuthenticationRequired, TokenRefused
from proxy.testing.issuer import TestIssuer, generate_key

ACME = r"github\.com/acme/.*"


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    async with TestIssuer() as running:
        yield running


@pytest.fixture
async def registry() -> AsyncIterator[KeyRegistry]:
    async with aiohttp.ClientSession() as session:
        keys = KeyRegistry(session)
        yield keys
        await keys.close()


def issuer_config(issuer: TestIssuer, **overrides: Any) -> IssuerConfig:
    data = {"name": "orchestrator", "issuer": issuer.url, "audience": "git-token-proxy", "jwksUrl": issuer.jwks_url}
    return IssuerConfig.model_validate({**data, "repos": [ACME], **overrides})


def verifier_for(
    issuer: TestIssuer, registry: KeyRegistry, revoked: tuple[str, ...] = (), **overrides: Any
) -> IdentityVerifier:
    return build_verifier([issuer_config(issuer, **overrides)], revoked, registry)


async def refusal(verifier: IdentityVerifier, token: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        await verifier.verify(token)
    assert isinstance(caught.value, AuthenticationRequired)  # a 401, whatever the reason
    reason = str(caught.value)
    assert "\n" not in reason and len(reason) < 300
    return reason


# ---------------------------------------------------------------- good tokens


async def test_a_good_token_gives_the_identity_and_the_issuers_scope(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry, push={"refs": ["refs/heads/agent/{client}/**"]})
    token = issuer.mint("sandbox-42", extra_claims={"jti": "run-42"})
    identity = await verifier.verify(token)
    assert (identity.issuer, identity.client, identity.subject, identity.token_id) == (
        "orchestrator", "sandbox-42", "sandbox-42", "run-42",
    )  # fmt: skip
    assert len(identity.fingerprint) == 8 and identity.fingerprint not in token
    assert identity.audit() == {
        "issuer": "orchestrator",
        "sub": "sandbox-42",
        "jti": "run-42",
        "token": identity.fingerprint,
    }
    assert identity.scope.allows_repo("github.com/acme/app")
    assert not identity.scope.allows_repo("github.com/other/app")
    assert not identity.scope.read_only
    assert [policy.config.refs for policy in identity.scope.push] == [["refs/heads/agent/{client}/**"]]


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
async def test_each_default_algorithm_verifies(issuer: TestIssuer, registry: KeyRegistry, algorithm: str) -> None:
    identity = await verifier_for(issuer, registry).verify(issuer.mint(alg=algorithm))
    assert identity.subject == "sandbox-1"


async def test_eddsa_when_the_issuer_allows_it(issuer: TestIssuer, registry: KeyRegistry) -> None:
    key = issuer.rotate("EdDSA")
    verifier = verifier_for(issuer, registry, algorithms=["EdDSA"])
    assert (await verifier.verify(issuer.mint(kid=key.kid))).subject == "sandbox-1"
    assert "not accepted" in await refusal(verifier, issuer.mint(alg="ES256"))


async def test_an_audience_list_containing_ours_and_the_leeway(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry)
    await verifier.verify(issuer.mint(aud=["other", "git-token-proxy"]))
    now = int(time.time())
    await verifier.verify(issuer.mint(extra_claims={"exp": now - 30, "iat": now - 300}))  # within 60 s of leeway
    await verifier.verify(issuer.mint(extra_claims={"nbf": now + 30}))


async def test_a_token_without_kid_needs_a_single_key(
    issuer: TestIssuer, registry: KeyRegistry, tmp_path: Path
) -> None:
    verifier = verifier_for(issuer, registry)
    assert "has several keys" in await refusal(verifier, issuer.mint(headers={"kid": None}))
    issuer.retire(issuer.key("RS256").kid)
    (tmp_path / "one.jwks.json").write_bytes(issuer.jwks_bytes())
    single = verifier_for(issuer, registry, jwksUrl=None, jwksFile=str(tmp_path / "one.jwks.json"))
    assert (await single.verify(issuer.mint(headers={"kid": None}))).subject == "sandbox-1"


async def test_the_client_name_comes_from_the_template(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry, client="gha-{repository}")
    identity = await verifier.verify(
        issuer.mint("repo:acme/app:ref:refs/heads/main", extra_claims={"repository": "acme/app"})
    )
    assert identity.client == "gha-acme/app"
    pod = verifier_for(issuer, registry, name="pods", client="{kubernetes.io/pod/name}")
    claims = {"kubernetes.io": {"namespace": "sandboxes", "pod": {"name": "sandbox-7f9c"}}}
    assert (
        await pod.verify(issuer.mint("system:serviceaccount:sandboxes:default", extra_claims=claims))
    ).client == "sandbox-7f9c"


async def test_a_remembered_token_is_verified_again_after_a_minute_or_past_its_expiry(
    issuer: TestIssuer, registry: KeyRegistry
) -> None:
    now = [time.time()]
    verifier = build_verifier([issuer_config(issuer)], (), registry, clock=lambda: now[0])
    token = issuer.mint(ttl=600)
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first
    now[0] += 61  # re-verified: a new identity object
    second = await verifier.verify(token)
    assert second is not first and second == first
    assert await verifier.verify(token) is second
    now[0] += 600  # past exp + leeway by the verifier's clock: not the remembered identity
    assert await verifier.verify(token) is not second


# ---------------------------------------------------------------- refusals


def _now() -> int:
    return int(time.time())


async def test_expired(issuer: TestIssuer, registry: KeyRegistry) -> None:
    reason = await refusal(verifier_for(issuer, registry), issuer.mint(extra_claims={"exp": _now() - 100}))
    assert reason.startswith("token expired ") and reason.endswith(" s ago")
    assert 99 <= int(reason.split()[2]) <= 110


async def test_not_yet_valid(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry)
    assert "not valid for another" in await refusal(verifier, issuer.mint(extra_claims={"nbf": _now() + 600}))
    future = {"iat": _now() + 600, "exp": _now() + 1200}
    assert "issued in the future" in await refusal(verifier, issuer.mint(extra_claims=future))


async def test_wrong_audience_and_issuer(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry)
    assert await refusal(verifier, issuer.mint(aud="another-service")) == "audience is not git-token-proxy"
    reason = await refusal(verifier, issuer.mint(iss="https://evil.example"))
    assert reason == "issuer 'https://evil.example' is not trusted by this proxy"


async def test_alg_none_and_hs256_keyed_with_the_public_key(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry)
    rsa = issuer.key("RS256")
    unsigned = issuer.forge_unsigned(issuer.claims(), kid=rsa.kid)
    assert "signing algorithm 'none' is not accepted" in await refusal(verifier, unsigned)
    for secret in (rsa.public_pem(), rsa.public_pem().strip(), issuer.jwks_bytes()):
        confused = issuer.forge_hs256(secret, issuer.claims(), kid=rsa.kid)
        assert "signing algorithm 'HS256' is not accepted" in await refusal(verifier, confused)


async def test_an_algorithm_the_key_does_not_fit(issuer: TestIssuer, registry: KeyRegistry) -> None:
    """RS256 named with the EC key's kid; PS256 with an RSA key the JWKS declares as RS256."""
    verifier = verifier_for(issuer, registry, algorithms=["ES256", "RS256", "PS256"])
    ec_kid, rsa = issuer.key("ES256").kid, issuer.key("RS256")
    assert "does not verify RS256 tokens" in await refusal(verifier, issuer.mint(alg="RS256", headers={"kid": ec_kid}))
    import jwt

    ps256 = jwt.encode(issuer.claims(), rsa.private, algorithm="PS256", headers={"kid": rsa.kid})
    assert "does not verify PS256 tokens" in await refusal(verifier, ps256)


async def test_another_key_with_the_same_kid(issuer: TestIssuer, registry: KeyRegistry) -> None:
    impostor = generate_key("ES256", kid=issuer.key("ES256").kid)
    import jwt

    forged = jwt.encode(issuer.claims(), impostor.private, algorithm="ES256", headers={"kid": impostor.kid})
    assert "signature does not verify" in await refusal(verifier_for(issuer, registry), forged)


async def test_a_tampered_payload(issuer: TestIssuer, registry: KeyRegistry) -> None:
    header, _, signature = issuer.mint("sandbox-1").split(".")
    other = issuer.mint("sandbox-2").split(".")[1]
    assert "signature does not verify" in await refusal(verifier_for(issuer, registry), f"{header}.{other}.{signature}")


async def test_an_unknown_kid(issuer: TestIssuer, registry: KeyRegistry) -> None:
    reason = await refusal(verifier_for(issuer, registry), issuer.mint(headers={"kid": "k9"}))
    assert reason == "unknown signing key (kid 'k9')"


async def test_over_max_token_lifetime(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry)
    reason = await refusal(verifier, issuer.mint(ttl=48 * 3600))
    assert reason == "token lifetime 48h exceeds maxTokenLifetime 24h of issuer 'orchestrator'"
    # Without iat, exp - now is the lifetime.
    assert "exceeds maxTokenLifetime 24h" in await refusal(verifier, issuer.mint(ttl=25 * 3600, omit=["iat"]))
    await verifier.verify(issuer.mint(ttl=23 * 3600, omit=["iat"]))
    # A long-ago iat with a far exp is a long lifetime too, however little of it is left.
    old = {"iat": _now() - 30 * 86400, "exp": _now() + 600}
    assert "exceeds" in await refusal(verifier, issuer.mint(extra_claims=old))
    short = verifier_for(issuer, registry, name="short", maxTokenLifetime="1h")
    assert "token lifetime 2h exceeds maxTokenLifetime 1h" in await refusal(short, issuer.mint(ttl=7200))


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "..", "eyJ.eyJ.", "W10.W10.x", "bm90IGpzb24.bm90IGpzb24.x", "é.é.é", "a.b.c.d",
     "eyJhbGciOiJFUzI1NiJ9.WwpbW1tbW1tbW1tb.x"],
)  # fmt: skip
async def test_garbage(issuer: TestIssuer, registry: KeyRegistry, token: str) -> None:
    assert "not a well-formed JWT" in await refusal(verifier_for(issuer, registry), token)


async def test_a_100_kb_token_is_refused_before_parsing(issuer: TestIssuer, registry: KeyRegistry) -> None:
    huge = issuer.mint(extra_claims={"padding": "x" * 100_000})
    assert (
        await refusal(verifier_for(issuer, registry), huge) == f"token is {len(huge) // 1024} KiB, over the 8 KiB limit"
    )
    assert "over the 8 KiB limit" in await refusal(verifier_for(issuer, registry), "[" * 100_000)


async def test_a_revoked_jti(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry, revoked=("run-7",))
    assert await refusal(verifier, issuer.mint(extra_claims={"jti": "run-7"})) == "token 'run-7' is revoked"
    await verifier.verify(issuer.mint(extra_claims={"jti": "run-8"}))


async def test_claims_rules(issuer: TestIssuer, registry: KeyRegistry) -> None:
    rules = {
        "repository_owner": "acme",
        "ref": {"pattern": "refs/heads/(main|release/.*)"},
        "kubernetes.io/namespace": "sandboxes",
        "groups": "agents",
        "email_verified": True,
    }
    verifier = verifier_for(issuer, registry, claims=rules)
    good = {
        "repository_owner": "acme", "ref": "refs/heads/release/1.2", "kubernetes.io": {"namespace": "sandboxes"},
        "groups": ["staff", "agents"], "email_verified": True,
    }  # fmt: skip
    await verifier.verify(issuer.mint(extra_claims=good))
    for claim, value in [
        ("repository_owner", "evil"), ("repository_owner", "ACME"), ("ref", "refs/heads/feature"),
        ("ref", "xrefs/heads/main"), ("kubernetes.io", {"namespace": "other"}), ("groups", ["staff"]),
        ("email_verified", 1), ("email_verified", "true"), ("repository_owner", ["acme-evil"]),
    ]:  # fmt: skip
        reason = await refusal(verifier, issuer.mint(extra_claims={**good, claim: value}))
        assert "does not satisfy the claims rules of issuer 'orchestrator'" in reason, (claim, value)
    missing = {key: value for key, value in good.items() if key != "repository_owner"}
    assert "'repository_owner'" in await refusal(verifier, issuer.mint(extra_claims=missing))


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
async def test_required_claims(issuer: TestIssuer, registry: KeyRegistry, claim: str) -> None:
    reason = await refusal(verifier_for(issuer, registry), issuer.mint(omit=[claim]))
    assert f"'{claim}'" in reason


@pytest.mark.parametrize(
    "claims",
    [{"exp": "9999999999"}, {"exp": True}, {"exp": 1e300}, {"iat": "now"}, {"nbf": [1]}, {"sub": 42},
     {"jti": {"a": 1}}, {"aud": {"git-token-proxy": 1}}, {"aud": [["git-token-proxy"]]}, {"exp": float("nan")}],
)  # fmt: skip
async def test_claims_of_the_wrong_type(issuer: TestIssuer, registry: KeyRegistry, claims: dict[str, Any]) -> None:
    await refusal(verifier_for(issuer, registry), issuer.mint(extra_claims=claims))


async def test_header_oddities(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry)
    assert "'crit'" in await refusal(verifier, issuer.mint(headers={"crit": ["exp"], "exp": 1}))
    assert "'kid' is not a string" in await refusal(verifier, issuer.mint(headers={"kid": 7}))
    # A token naming its own key (jwk, jku, x5u) is verified against the issuer's keys all the same.
    attacker = generate_key("ES256")
    import jwt

    header = {"kid": attacker.kid, "jwk": attacker.public_jwk(), "jku": "http://127.0.0.1:1/keys"}
    forged = jwt.encode(issuer.claims(), attacker.private, algorithm="ES256", headers=header)
    assert "unknown signing key" in await refusal(verifier, forged)


async def test_client_names_that_cannot_be_used(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry, client="{repository}")
    assert "is absent or not text" in await refusal(verifier, issuer.mint())
    assert "is absent or not text" in await refusal(verifier, issuer.mint(extra_claims={"repository": 5}))
    for name in ["a b", "x" * 129, "name\n", "ü", "a;b", "{client}", "refs/heads/*", ""]:
        reason = await refusal(verifier, issuer.mint(extra_claims={"repository": name}))
        assert "is not 1-128 characters" in reason, name


# ---------------------------------------------------------------- scope claims


async def test_a_scope_claim_narrows_repos_read_only_and_push(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry, scopeClaim="gtp", push={"refs": ["refs/heads/agent/{client}/**"]})
    claim = {"repos": [r"github\.com/acme/app", r"github\.com/other/app"], "readOnly": True,
             "push": {"refs": ["refs/heads/agent/{client}/fix"]}}  # fmt: skip
    identity = await verifier.verify(issuer.mint(extra_claims={"gtp": claim}))
    assert identity.scope.allows_repo("github.com/acme/app")
    assert not identity.scope.allows_repo("github.com/acme/tools")  # the claim does not name it
    assert not identity.scope.allows_repo("github.com/other/app")  # the issuer does not allow it: never widened
    assert identity.scope.read_only
    assert [policy.config.refs for policy in identity.scope.push] == [
        ["refs/heads/agent/{client}/**"],
        ["refs/heads/agent/{client}/fix"],
    ]
    unscoped = await verifier.verify(issuer.mint())  # no claim: the issuer's scope
    assert unscoped.scope.allows_repo("github.com/acme/tools") and not unscoped.scope.read_only


async def test_a_scope_claim_cannot_lift_read_only(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = verifier_for(issuer, registry, scopeClaim="gtp", readOnly=True)
    identity = await verifier.verify(issuer.mint(extra_claims={"gtp": {"readOnly": False, "repos": [".*"]}}))
    assert identity.scope.read_only
    assert not identity.scope.allows_repo("github.com/other/app")


@pytest.mark.parametrize(
    "claim",
    ["github.com/acme/app", ["x"], {"repos": "github.com/acme/app"}, {"repos": [1]}, {"readOnly": "yes"},
     {"push": {"refs": "refs/heads/x"}}, {"push": ["refs/heads/x"]}, {"repo": ["x"]}, {"repos": ["(unclosed"]},
     {"repos": ["x"] * 101}, {"repos": ["(?=lookahead)"]}],
)  # fmt: skip
async def test_a_malformed_scope_claim_is_refused(issuer: TestIssuer, registry: KeyRegistry, claim: object) -> None:
    verifier = verifier_for(issuer, registry, scopeClaim="gtp")
    assert "scope claim 'gtp' is malformed" in await refusal(verifier, issuer.mint(extra_claims={"gtp": claim}))


# ---------------------------------------------------------------- secrets stay out of logs


async def test_no_token_in_any_log_record(
    issuer: TestIssuer, registry: KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    verifier = verifier_for(issuer, registry, scopeClaim="gtp", claims={"repository_owner": "acme"})
    tokens = [
        issuer.mint(extra_claims={"repository_owner": "acme"}),
        issuer.mint(extra_claims={"repository_owner": "evil"}),
        issuer.mint(headers={"kid": "made-up"}),
        issuer.mint(ttl=-500),
        issuer.mint(extra_claims={"repository_owner": "acme", "gtp": {"repos": "x"}}),
        issuer.forge_hs256(issuer.key("RS256").public_pem(), issuer.claims(), kid=issuer.key("RS256").kid),
    ]
    reasons = []
    for token in tokens:
        try:
            await verifier.verify(token)
        except TokenRefused as error:
            reasons.append(str(error))
    assert len(reasons) == 5
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert logged, "the JWKS fetch is logged"
    for token in tokens:
        _, claims, signature = token.split(".")
        for text in (token, claims, signature, signature[:16]):
            assert text not in logged
            assert all(text not in reason for reason in reasons)


# ---------------------------------------------------------------- config


def _config_error(**data: Any) -> str:
    base = {"name": "ci", "issuer": "https://token.actions.githubusercontent.com", "audience": "git-token-proxy",
            "repos": [ACME]}  # fmt: skip
    with pytest.raises(ValidationError) as caught:
        IssuerConfig.model_validate({**base, **data})
    return str(caught.value)


def test_the_issue_example_loads() -> None:
    config = IssuerConfig.model_validate({
        "name": "orchestrator", "issuer": "https://orchestrator.internal", "audience": "git-token-proxy",
        "jwksFile": "/etc/git-token-proxy/orchestrator.jwks.json", "algorithms": ["ES256", "RS256"],
        "client": "{sub}", "repos": ["github\\.com/acme/.*"], "readOnly": False,
        "push": {"refs": ["refs/heads/agent/{client}/**"]}, "claims": {"repository_owner": "acme"},
        "scopeClaim": "git_token_proxy", "maxTokenLifetime": "24h",
    })  # fmt: skip
    assert config.max_token_lifetime == 86400 and config.discovery_url is None
    actions = IssuerConfig.model_validate(
        {"name": "actions", "issuer": "https://token.actions.githubusercontent.com", "audience": "git-token-proxy",
         "repos": [ACME], "client": "{repository}"}
    )  # fmt: skip
    assert actions.algorithms == ["ES256", "RS256"]
    assert actions.discovery_url == "https://token.actions.githubusercontent.com/.well-known/openid-configuration"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"algorithms": ["HS256"]}, "'HS256' is refused: only public-key algorithms"),
        ({"algorithms": ["none"]}, "'none' is refused"),
        ({"algorithms": ["XS256"]}, "unknown algorithm 'XS256'"),
        ({"algorithms": []}, "at least 1 item"),
        ({"client": "sandbox"}, "must name a claim"),
        ({"client": "{sub"}, "brace that does not close"),
        ({"client": "{}"}, "must name a claim"),
        ({"client": "{{sub}}"}, "brace that does not close"),
        ({"client": "a b {sub}"}, "text outside {...} may use only"),
        ({"name": "has space"}, "name must be 1-64 characters"),
        ({"maxTokenLifetime": "0s"}, "longer than zero"),
        ({"maxTokenLifetime": "soon"}, "is not a duration"),
        ({"claims": {"ref": {"pattern": "(?=x)"}}}, "does not compile"),
        ({"jwksFile": "/x.json", "jwksUrl": "https://x/keys"}, "give jwksFile or jwksUrl, not both"),
        ({"jwksUrl": "http://keys.example/jwks"}, "plain http"),
        ({"jwksUrl": "https://user:pw@keys.example/jwks"}, "no user:password@"),
        ({"jwksUrl": "ftp://keys.example/jwks"}, "must be an https:// URL"),
        ({"issuer": "http://orchestrator.internal"}, "without jwksFile or jwksUrl, keys are found by OIDC discovery"),
        ({"issuer": "orchestrator"}, "give jwksFile or jwksUrl"),
        ({"jwksURL": "https://x"}, "Extra inputs are not permitted"),
        ({"repos": []}, "at least 1 item"),
    ],
)
def test_config_mistakes_name_the_key_and_the_fix(data: dict[str, Any], message: str) -> None:
    assert message in _config_error(**data)


def test_loopback_issuers_may_use_plain_http() -> None:
    for url in ("http://127.0.0.1:8000", "http://localhost:9", "http://[::1]:80/x"):
        IssuerConfig.model_validate({"name": "t", "issuer": url, "audience": "a", "repos": ["x"]})


def test_issuers_are_unique() -> None:
    one = IssuerConfig.model_validate({"name": "a", "issuer": "https://i.example", "audience": "x", "repos": ["x"]})
    other = one.model_copy(update={"name": "b"})
    assert issuers_problem([one, one.model_copy(update={"issuer": "https://j.example"})]) is not None
    assert "issuer 'https://i.example' is listed twice" in (issuers_problem([one, other]) or "")
    assert issuers_problem([one]) is None


def test_presented_credentials() -> None:
    assert bearer_token("Bearer a.b.c") == "a.b.c"
    assert bearer_token("bearer  a.b.c ") == "a.b.c"
    assert bearer_token("Basic a.b.c") is None and bearer_token(None) is None and bearer_token("Bearer ") is None
    assert looks_like_jwt("a.b.c") and not looks_like_jwt("a-static-client-token") and not looks_like_jwt("a.b")


def test_claim_paths() -> None:
    claims = {"kubernetes.io": {"pod": {"name": "p"}}, "https://example.com/role": "r", "a": "plain"}
    assert claim_at(claims, "kubernetes.io/pod/name") == "p"
    assert claim_at(claims, "https://example.com/role") == "r"  # a top-level name with slashes, whole
    assert claim_at(claims, "a") == "plain"
    assert claim_at(claims, "a/b") is None and claim_at(claims, "kubernetes.io/pod/uid") is None


def test_the_config_model_loads_neither_pyjwt_nor_cryptography() -> None:
    """A proxy with static client tokens alone imports this module's model; PyJWT comes with the first issuer."""
    script = (
        "import sys; from proxy.access.identities import IssuerConfig; "
        "IssuerConfig.model_validate({'name': 'a', 'issuer': 'https://i.example', 'audience': 'a', 'repos': ['x']}); "
        "print(sorted(m for m in ('jwt', 'cryptography', 'proxy.access.jwks') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
