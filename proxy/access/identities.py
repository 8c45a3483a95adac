"""Identities: a client proved by a JWT from an issuer in `access.issuers`, verified into a name and a scope.

PyJWT and cryptography are imported only when keys are loaded (`jwks`) or a token is verified: a proxy with static
client tokens alone never loads them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from ..bounded import BoundedDict
from ..config.base import ConfigError
from ..config.issuers import ClaimPattern, IssuerConfig
from ..config.push import PushPolicyConfig
from ..errors import TokenRefused
from ..routing import LinearPattern, compile_repo_pattern
from .clients import Scope, push_policies

if TYPE_CHECKING:
    from jwt import PyJWK

    from ..push.rules import PushPolicy


def compile_claim_pattern(pattern: str) -> LinearPattern:
    """A `claims` pattern: RE2 (linear time), case-sensitive, matched against the whole claim."""
    options = re2.Options()
    options.log_errors = False
    compiled: LinearPattern = re2.compile(pattern, options)
    return compiled


# ---------------------------------------------------------------- limits and names

# Projected service-account and Actions tokens are 1-2 KiB; checked before any parsing. As a Basic password it
# must also fit the server's header limit (app.MAX_HEADER_FIELD), with room for a username.
MAX_TOKEN_CHARS = 8 * 1024
LEEWAY = 60.0  # seconds of clock skew allowed on exp, nbf and iat
# A client name feeds `{client}` in push patterns, the audit and log lines: plain characters only. ':' is in for
# Kubernetes subjects (system:serviceaccount:ns:name), '/' for Actions' `{repository}` (owner/repo).
SAFE_CLIENT_NAME = re.compile(r"[A-Za-z0-9._@:/-]{1,128}")
VERIFIED_TOKENS = 4096  # identities remembered per verifier (about 2 MiB)
REVERIFY_AFTER = 60.0  # a remembered identity is verified again after this long
_SHOWN = 80  # characters of a value taken from a token that a reason may quote


# ---------------------------------------------------------------- what a verified token gives


@dataclass(frozen=True)
class VerifiedIdentity:
    issuer: str  # the issuer entry's name
    client: str  # from the `client` template: a safe name
    subject: str
    token_id: str | None  # jti
    fingerprint: str  # 8 hex digits of SHA-256 of the token: names it in the audit without revealing it
    expires_at: float
    scope: Scope

    def audit(self) -> dict[str, str | None]:
        """The audit line's `identity`."""
        return {"issuer": self.issuer, "sub": self.subject, "jti": self.token_id, "token": self.fingerprint}


# ---------------------------------------------------------------- verification
# What the verifier asks of keys, wherever they come from (jwks.py: a jwksFile, a URL, discovery). Declared here,
# by the one that uses them: jwks imports this module, never the other way round.


class VerifyingKey(Protocol):
    @property
    def description(self) -> str:
        """ "EC P-256", "RSA-2048": for reasons."""

    @property
    def by_algorithm(self) -> Mapping[str, PyJWK]:
        """The algorithms this key verifies, each bound to it once: never taken from a token."""


class SigningKeys(Protocol):
    def find(self, kid: str | None) -> VerifyingKey | None: ...

    async def refetch(self) -> None:
        """Called on an unknown kid; may fetch, within the source's limits."""

    @property
    def problem(self) -> str | None:
        """Why there are no keys at all (for a reason), or None."""


class KeySources(Protocol):
    def keys_for(self, config: IssuerConfig) -> SigningKeys:
        """The issuer's keys; ConfigError naming the issuer when they cannot be had (a bad jwksFile)."""


@dataclass(frozen=True)
class _Issuer:
    config: IssuerConfig
    keys: SigningKeys
    scope: Scope  # the issuer's own, shared by every token without a scope claim
    claim_rules: tuple[tuple[str, object], ...]  # (claim path, value or compiled pattern)
    template: tuple[str, ...]  # literal, claim, literal, claim, ..., literal


def build_verifier(
    issuers: Sequence[IssuerConfig],
    revoked: Collection[str],
    registry: KeySources,
    clock: Callable[[], float] = time.time,
) -> IdentityVerifier:
    """Once per config, inside the running loop: keys come from the registry (jwks.KeyRegistry), which keeps them
    across reloads. A problem is a ConfigError naming the issuer."""
    built = []
    for config in issuers:
        where = f"access.issuers {config.name!r}"
        keys = registry.keys_for(config)
        repos = tuple(compile_repo_pattern(where, pattern) for pattern in config.repos)
        push = push_policies(f"issuer {config.name!r}", config.push)
        rules = tuple(
            (path, compile_claim_pattern(rule.pattern) if isinstance(rule, ClaimPattern) else rule)
            for path, rule in config.claims.items()
        )
        template = tuple(re.split(r"\{([^{}]+)\}", config.client))
        built.append(_Issuer(config, keys, Scope((repos,), config.read_only, push), rules, template))
    return IdentityVerifier(built, frozenset(revoked), clock)


class IdentityVerifier:
    """Verifies a JWT against the issuer its `iss` names. Built once per config (so a reload, a new revocation list
    included, starts with an empty cache); `verify` is the per-request part."""

    def __init__(
        self, issuers: Sequence[_Issuer], revoked: frozenset[str], clock: Callable[[], float] = time.time
    ) -> None:
        self._issuers = {issuer.config.issuer: issuer for issuer in issuers}
        self._revoked = revoked
        self._clock = clock
        # SHA-256 of a token → its identity and when it was verified. Git sends the same token with every request
        # of an operation; PyJWT's parse and the signature check cost 0.2-0.4 ms, a hit about 2 µs.
        self._verified: BoundedDict[bytes, tuple[VerifiedIdentity, float]] = BoundedDict(VERIFIED_TOKENS)

    def __bool__(self) -> bool:
        return bool(self._issuers)

    @property
    def key_sets(self) -> list[SigningKeys]:
        """For KeyRegistry.retain after a reload."""
        return [issuer.keys for issuer in self._issuers.values()]

    async def verify(self, token: str) -> VerifiedIdentity:
        """The identity, or TokenRefused with a one-line reason that quotes nothing of the token's signature."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRefused(f"token is {len(token) // 1024} KiB, over the {MAX_TOKEN_CHARS // 1024} KiB limit")
        if not token.isascii():  # a JWS in compact form is base64url and dots
            raise TokenRefused("token is not a well-formed JWT")
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        remembered = self._verified.get(digest)
        if remembered is not None:
            identity, verified_at = remembered
            # Expiry as PyJWT judges it. Re-verified after a while all the same: a key the issuer has since
            # withdrawn from its JWKS stops working within REVERIFY_AFTER plus the JWKS refresh interval.
            if now - verified_at < REVERIFY_AFTER and identity.expires_at > now - LEEWAY:
                return identity
            del self._verified[digest]
        identity = await self._verify_fully(token, digest.hex()[:8])
        self._verified[digest] = (identity, now)
        return identity

    async def _verify_fully(self, token: str, token_fingerprint: str) -> VerifiedIdentity:
        header, unverified = _peek(token)
        # Reading claims before the signature is checked is only to choose the issuer and its key (as every JWT
        # library's key look-up does); nothing read here is trusted, and PyJWT parses the token again, strictly.
        issuer = self._issuer_of(unverified)
        algorithm = header.get("alg")
        if algorithm not in issuer.config.algorithms:
            raise TokenRefused(
                f"signing algorithm {_shown(algorithm)} is not accepted from issuer {issuer.config.name!r} "
                f"(it allows {', '.join(issuer.config.algorithms)})"
            )
        key = await _signing_key(issuer, header)
        claims = _decode(token, key, header, issuer.config, self._clock())
        return self._identity(issuer, claims, token_fingerprint)

    def _issuer_of(self, unverified: Mapping[str, Any]) -> _Issuer:
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise TokenRefused("token has no 'iss' claim naming its issuer")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise TokenRefused(f"issuer {_shown(iss)} is not trusted by this proxy")
        return issuer

    def _identity(self, issuer: _Issuer, claims: Mapping[str, Any], token_fingerprint: str) -> VerifiedIdentity:
        config = issuer.config
        now = self._clock()
        exp = _number(claims, "exp")
        iat = _number(claims, "iat") if "iat" in claims else None
        if "nbf" in claims:
            _number(claims, "nbf")
        lifetime = exp - (iat if iat is not None else now)
        if lifetime > config.max_token_lifetime:
            raise TokenRefused(
                f"token lifetime {_compact(lifetime)} exceeds maxTokenLifetime {_compact(config.max_token_lifetime)}"
                f" of issuer {config.name!r}"
            )
        for path, rule in issuer.claim_rules:
            _require_claim(config.name, path, rule, claim_at(claims, path))
        subject, jti = claims["sub"], claims.get("jti")
        if not isinstance(subject, str) or not (jti is None or isinstance(jti, str)):
            raise TokenRefused("token's 'sub' or 'jti' claim is not text")
        if jti is not None and jti in self._revoked:
            raise TokenRefused(f"token {_shown(jti)} is revoked")
        scope = issuer.scope
        if config.scope_claim is not None and config.scope_claim in claims:
            scope = _narrowed(scope, config.scope_claim, claims[config.scope_claim])
        client = _client_name(issuer, claims)
        return VerifiedIdentity(config.name, client, subject, jti, token_fingerprint, exp, scope)


def _peek(token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The header and the claims, unverified: base64url and JSON, no more (PyJWT's strict parse comes next)."""
    try:
        header_part, claims_part, _signature = token.split(".")
        header, claims = (
            json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))) for part in (header_part, claims_part)
        )
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise TokenRefused("token is not a well-formed JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenRefused("token is not a well-formed JWT")
    if "crit" in header:  # RFC 7515: extensions the verifier does not understand make the token invalid
        raise TokenRefused("token header has 'crit' extensions, which this proxy does not implement")
    return header, claims


async def _signing_key(issuer: _Issuer, header: Mapping[str, Any]) -> PyJWK:
    """The PyJWK for the header's kid and alg. An unknown kid asks the keys to refetch (rate-limited per issuer)."""
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRefused("token header's 'kid' is not a string")
    key = issuer.keys.find(kid)
    if key is None:
        await issuer.keys.refetch()
        key = issuer.keys.find(kid)
    if key is None:
        problem = issuer.keys.problem
        if problem is not None:
            raise TokenRefused(f"issuer {issuer.config.name!r} has no usable signing key ({problem})")
        if kid is None:
            raise TokenRefused(f"token has no 'kid' and issuer {issuer.config.name!r} has several keys")
        raise TokenRefused(f"unknown signing key (kid {_shown(kid)})")
    verifying = key.by_algorithm.get(header["alg"])
    if verifying is None:
        raise TokenRefused(f"signing key {_shown(kid)} is {key.description}: it does not verify {header['alg']} tokens")
    return verifying


def _decode(token: str, key: PyJWK, header: Mapping[str, Any], config: IssuerConfig, now: float) -> Mapping[str, Any]:
    """Signature first, then iss, aud, exp (all required), nbf and iat when present: PyJWT's checks, its errors
    turned into reasons. Numbers quoted in them come from claims whose signature has verified."""
    import jwt

    algorithm, kid = str(header["alg"]), header.get("kid")
    try:
        claims: Mapping[str, Any] = jwt.decode(
            token, key=key, algorithms=[algorithm], audience=config.audience, issuer=config.issuer, leeway=LEEWAY,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )  # fmt: skip
    except jwt.InvalidSignatureError:
        key_named = f"kid {_shown(kid)}" if kid is not None else "its only key"
        raise TokenRefused(f"token signature does not verify (issuer {config.name!r}, {key_named})") from None
    except jwt.ExpiredSignatureError:
        raise TokenRefused(f"token expired {_span(now - _number(_claims(token), 'exp'))} ago") from None
    except jwt.ImmatureSignatureError:
        raise TokenRefused(_immature(_claims(token), now)) from None
    except jwt.InvalidAudienceError:
        raise TokenRefused(f"audience is not {config.audience}") from None
    except jwt.InvalidIssuerError:
        raise TokenRefused(f"issuer is not {config.issuer}") from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenRefused(f"token has no {error.claim!r} claim") from None
    except jwt.InvalidIssuedAtError:
        raise TokenRefused("token's 'iat' claim is not a date in seconds") from None
    except jwt.InvalidAlgorithmError:
        raise TokenRefused(f"signing algorithm {algorithm} does not fit the key") from None
    except (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError):
        raise TokenRefused("token is malformed (a claim of the wrong type, or undecodable)") from None
    return claims


def _claims(token: str) -> Mapping[str, Any]:
    """Claims again, for a reason's numbers: only called once PyJWT has verified the signature."""
    return _peek(token)[1]


def _immature(claims: Mapping[str, Any], now: float) -> str:
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and nbf > now:
        return f"token is not valid for another {_span(nbf - now)} (nbf)"
    return "token was issued in the future (iat): check the issuer's clock"


def _number(claims: Mapping[str, Any], name: str) -> float:
    """NumericDate: PyJWT takes "123" for 123; RFC 7519 does not, and neither does this proxy."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) > 1e12:
        raise TokenRefused(f"token's {name!r} claim is not a date in seconds")
    return float(value)


def claim_at(claims: Mapping[str, Any], path: str) -> object:
    """A claim by name, or a nested one by path with '/' between keys (`kubernetes.io/namespace`): a top-level
    claim whose name is the whole path comes first. None when absent."""
    if path in claims:
        return claims[path]
    value: object = claims
    for key in path.split("/"):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def _require_claim(issuer: str, path: str, rule: object, value: object) -> None:
    """A string claim, or any item of a list claim (`groups`), must equal the value or match the pattern."""
    candidates = value if isinstance(value, list) else [value]
    if any(_claim_matches(rule, candidate) for candidate in candidates):
        return
    shown = f" (it is {_shown(value)})" if isinstance(value, str | int | bool) else " (absent or not a plain value)"
    raise TokenRefused(f"claim {path!r} does not satisfy the claims rules of issuer {issuer!r}{shown}")


def _claim_matches(rule: object, candidate: object) -> bool:
    if isinstance(rule, str | bool | int):
        return type(candidate) is type(rule) and candidate == rule  # True is not 1
    return isinstance(candidate, str) and rule.fullmatch(candidate) is not None  # type: ignore[attr-defined]


def _client_name(issuer: _Issuer, claims: Mapping[str, Any]) -> str:
    parts = []
    for index, part in enumerate(issuer.template):
        if index % 2 == 0:
            parts.append(part)
            continue
        value = claim_at(claims, part)
        if not isinstance(value, str):
            raise TokenRefused(f"claim {part!r} (for the client name {issuer.config.client!r}) is absent or not text")
        parts.append(value)
    name = "".join(parts)
    if not SAFE_CLIENT_NAME.fullmatch(name):
        raise TokenRefused(
            f"client name {_shown(name)} (from {issuer.config.client!r}) is not 1-128 characters of "
            "A-Z a-z 0-9 . _ @ : / -"
        )
    return name


# ---------------------------------------------------------------- scope claims


class ScopeClaim(BaseModel):
    """A token's scope claim: `{"repos": [...], "readOnly": true, "push": {"refs": [...]}}`, each part optional."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True, strict=True)

    repos: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(default=None, max_length=100)
    read_only: bool = False
    push: PushPolicyConfig | None = None  # may only narrow: the issuer's policies apply as well


def parse_scope_claim(value: object) -> ScopeClaim:
    """Also what `grant --scope` checks its JSON with. ValueError: one line on what is wrong."""
    try:
        return ScopeClaim.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part)[:40] for part in first["loc"]) or "the claim"
        raise ValueError(f"{where}: {first['msg']}") from None


@lru_cache(maxsize=1024)
def _claimed_repo_pattern(pattern: str) -> LinearPattern:
    return compile_repo_pattern("scope claim", pattern)


def _narrowed(scope: Scope, claim_name: str, value: object) -> Scope:
    try:
        claimed = parse_scope_claim(value)
        repos = None if claimed.repos is None else tuple(_claimed_repo_pattern(p) for p in claimed.repos)
    except (ValueError, ConfigError) as error:
        raise TokenRefused(f"scope claim {claim_name!r} is malformed: {str(error)[:200]}") from None
    return Scope(
        scope.repo_sets + ((repos,) if repos is not None else ()),
        scope.read_only or claimed.read_only,
        scope.push + _claimed_push(claimed.push),
    )


_CLAIMED_POLICIES: BoundedDict[str, tuple[PushPolicy, ...]] = BoundedDict(1024)


def _claimed_push(config: PushPolicyConfig | None) -> tuple[PushPolicy, ...]:
    """A scope claim's push policy, compiled once per distinct claim (the sandboxes of one orchestrator share
    one), by its canonical JSON."""
    if config is None:
        return ()
    key = config.model_dump_json()
    compiled = _CLAIMED_POLICIES.get(key)
    if compiled is None:
        compiled = _CLAIMED_POLICIES[key] = push_policies("the token's scope claim", config)
    return compiled


# ---------------------------------------------------------------- wording


def _shown(value: object) -> str:
    """A value from a token, quoted in a reason: clipped, and repr() escapes what a terminal would act on."""
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…")


def _span(seconds: float) -> str:
    """How long ago or ahead, for prose: `40 s`, `12 min`, `5 h`, `3 days`."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def _compact(seconds: float) -> str:
    """A duration as config writes it: `24h`, `1h30m`, `90s`."""
    hours, rest = divmod(max(0, round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"
