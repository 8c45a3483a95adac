"""Issuers: `access.issuers`, the JWT issuers whose tokens prove who a client is (signed identities)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base import Model, from_config_folder
from .push import PushPolicyConfig
from .server import is_loopback
from .units import PositiveDuration

# Asymmetric only: with HS* the "key" would be the public JWKS itself (algorithm confusion), and `none` signs nothing.
SIGNING_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS = ("ES256", "RS256")
DEFAULT_MAX_TOKEN_LIFETIME = 24 * 3600.0
_SAFE_LITERAL = re.compile(r"[A-Za-z0-9._@:/-]*")
_ISSUER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SHOWN = 80  # characters of a configured value a message may quote
_QUIET = re2.Options()
_QUIET.log_errors = False


def url_problem(url: str) -> str | None:
    """Why `url` cannot be fetched for keys, or None: https, or plain http to a loopback address (tests)."""
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:  # an unclosed '[' of an IPv6 literal, a port that is not a number
        return f"{url[:_SHOWN]!r} is not a URL"
    if parts.scheme not in ("https", "http") or not host:
        return f"{url[:_SHOWN]!r} must be an https:// URL"
    if parts.username is not None or parts.password is not None or parts.fragment:
        return "the URL must have no user:password@ and no #fragment"
    if parts.scheme == "http" and not is_loopback(host):
        return f"{url[:_SHOWN]!r} is plain http: keys are fetched over https (plain http only for loopback addresses)"
    return None


class ClaimPattern(BaseModel):
    """`{pattern: 'refs/heads/(main|release/.*)'}`: the claim must match the whole RE2 pattern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(min_length=1, max_length=1000)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re2.compile(pattern, _QUIET)
        except re2.error:
            raise ValueError(f"pattern {pattern!r} does not compile (RE2: no lookarounds or backreferences)") from None
        return pattern


# A plain value must equal the claim (a string, a number, true/false); a pattern must match it whole.
ClaimRule = StrictStr | StrictBool | StrictInt | ClaimPattern


def template_claims(template: str) -> tuple[str, ...]:
    """The claims a `client` template names, in order: `gha-{repository}` → ('repository',)."""
    return tuple(_PLACEHOLDER.findall(template))


class IssuerConfig(Model):
    """An issuer whose JWTs this proxy accepts (`access.issuers[]`): where its keys are, which tokens it takes, and
    the scope its clients get. A jwksFile is read by the loader (`jwks.with_jwks_file`), not here."""

    name: str
    issuer: str = Field(min_length=1, max_length=2048)
    audience: str = Field(min_length=1, max_length=1024)
    jwks_file: Path | None = None
    jwks_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS), min_length=1)
    client: str = "{sub}"
    repos: list[str] = Field(min_length=1)  # as access.clients[].repos
    read_only: bool = False
    push: PushPolicyConfig | None = None  # as on access.clients[]
    claims: dict[str, ClaimRule] = Field(default_factory=dict, max_length=50)
    scope_claim: str | None = Field(default=None, min_length=1, max_length=256)
    max_token_lifetime: PositiveDuration = DEFAULT_MAX_TOKEN_LIFETIME
    _jwks: bytes | None = PrivateAttr(default=None)  # the jwksFile's content, as the loader read it

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, name: str) -> str:
        if not _ISSUER_NAME.fullmatch(name):
            raise ValueError("name must be 1-64 characters of letters, digits and . _ - (it appears in logs)")
        return name

    @field_validator("jwks_file")
    @classmethod
    def _file_beside_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else from_config_folder(path, info)

    @field_validator("jwks_url")
    @classmethod
    def _url_fetchable(cls, url: str | None) -> str | None:
        problem = None if url is None else url_problem(url)
        if problem is not None:
            raise ValueError(f"jwksUrl: {problem}")
        return url

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algorithms: list[str]) -> list[str]:
        for algorithm in algorithms:
            if algorithm.lower() == "none" or algorithm.upper().startswith("HS"):
                raise ValueError(
                    f"{algorithm!r} is refused: only public-key algorithms are accepted (a token signed with "
                    f"{algorithm} could be forged by anyone); use ES256, RS256 or EdDSA"
                )
            if algorithm not in SIGNING_ALGORITHMS:
                raise ValueError(
                    f"unknown algorithm {algorithm!r}; use some of {', '.join(sorted(SIGNING_ALGORITHMS))}"
                )
        return list(dict.fromkeys(algorithms))

    @field_validator("client")
    @classmethod
    def _template_names_claims(cls, template: str) -> str:
        names = template_claims(template)
        rest = _PLACEHOLDER.sub("", template)
        if "{" in rest or "}" in rest:
            raise ValueError(f"client template {template!r} has a brace that does not close a {{claim}}")
        if not names or any(not name.strip() for name in names):
            raise ValueError(f"client template {template!r} must name a claim, as in '{{sub}}' or '{{repository}}'")
        if not _SAFE_LITERAL.fullmatch(rest):
            raise ValueError(f"client template {template!r}: text outside {{...}} may use only A-Z a-z 0-9 . _ @ : / -")
        return template

    @model_validator(mode="after")
    def _keys_somewhere(self) -> Self:
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError(
                f"issuer {self.name!r}: give jwksFile or jwksUrl, not both (neither: OIDC discovery at "
                "{issuer}/.well-known/openid-configuration)"
            )
        if self.jwks_file is None and self.jwks_url is None:
            problem = url_problem(self.issuer)
            if problem is not None:
                raise ValueError(
                    f"issuer {self.name!r}: without jwksFile or jwksUrl, keys are found by OIDC discovery at the "
                    f"issuer URL, and {problem}; give jwksFile or jwksUrl"
                )
        return self

    @property
    def jwks(self) -> bytes | None:
        """The jwksFile's bytes, once the loader has read them."""
        return self._jwks

    def with_jwks(self, document: bytes) -> IssuerConfig:
        """The same settings with the jwksFile's content, as the loader read it (see jwks.with_jwks_file)."""
        copy = self.model_copy()
        copy._jwks = document
        return copy

    @property
    def discovery_url(self) -> str | None:
        """Where discovery looks, when neither jwksFile nor jwksUrl is given."""
        if self.jwks_file is not None or self.jwks_url is not None:
            return None
        return f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"


def issuers_problem(issuers: Sequence[IssuerConfig]) -> str | None:
    """For AccessConfig's validator: each issuer once (the token's `iss` picks its entry), each name once."""
    for what, values in (("name", [i.name for i in issuers]), ("issuer", [i.issuer for i in issuers])):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            return f"access.issuers: {what} {repeated[0]!r} is listed twice; each issuer needs one entry of its own"
    return None
