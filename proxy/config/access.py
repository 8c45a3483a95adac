"""Access: the clients of this proxy, their secrets, the repos they may reach, and whether they may push."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from pydantic import Field, SecretStr, model_validator

from .base import Model
from .issuers import IssuerConfig, issuers_problem
from .push import PushPolicyConfig


class AccessClient(Model):
    """A client of this proxy: its own secret, the repos it may reach, and whether it may push."""

    name: str
    token: SecretStr | None = None
    token_sha256: str | None = None  # hex SHA-256 of the token, so the config file holds no secret
    repos: list[str] = Field(min_length=1)  # regexes like urlPattern, matched as prefixes of host/owner/repo
    read_only: bool = False
    push: PushPolicyConfig | None = None  # which ref updates this client may push (all: none given)

    @model_validator(mode="after")
    def _one_secret(self) -> AccessClient:
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError(f"client {self.name!r}: give exactly one of token and tokenSha256")
        if self.token_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.token_sha256):
            raise ValueError(f"client {self.name!r}: tokenSha256 must be 64 hex digits")
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise ValueError(f"client {self.name!r}: token is shorter than 16 characters")
        return self

    @property
    def digest(self) -> bytes:
        if self.token_sha256 is not None:
            return bytes.fromhex(self.token_sha256)
        assert self.token is not None
        return hashlib.sha256(self.token.get_secret_value().encode()).digest()


Jti = Annotated[str, Field(min_length=1, max_length=256)]


class AccessConfig(Model):
    """Who may use the proxy: clients with static tokens, and issuers whose signed tokens (JWTs) prove who a
    client is. Either one turns access control on."""

    clients: list[AccessClient] = Field(default_factory=list)
    issuers: list[IssuerConfig] = Field(default_factory=list)
    # Token ids (`jti`) refused whatever their signature says, reloaded like the rest; short token lifetimes are
    # the main tool, this one is for the token that leaked.
    revoked: list[Jti] = Field(default_factory=list, max_length=100_000)

    @property
    def enabled(self) -> bool:
        return bool(self.clients or self.issuers)

    @model_validator(mode="after")
    def _names_unique(self) -> AccessConfig:
        names = [client.name for client in self.clients]
        if len(set(names)) != len(names):
            raise ValueError("access.clients: every client needs its own name")
        problem = issuers_problem(self.issuers)
        if problem is not None:
            raise ValueError(problem)
        return self
