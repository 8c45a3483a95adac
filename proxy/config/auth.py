"""Auth entries (`github.appInstallation`, as Concord names it): static tokens and GitHub Apps, told apart by
their `type`, each tag defined once here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, SecretStr, Tag, ValidationInfo, field_validator, model_validator

from ..github_permissions import permission_problem
from ..pem import key_file_of
from .base import Model, from_config_folder
from .push import PushPolicyConfig
from .units import Duration, PositiveDuration, PositiveId

# The `type` of an entry, as Concord spells it (read case-insensitively); every mention of a tag uses these.
OAUTH_TOKEN = "OAUTH_TOKEN"
GITHUB_APP_INSTALLATION = "GITHUB_APP_INSTALLATION"
ENTRY_TYPES = (GITHUB_APP_INSTALLATION, OAUTH_TOKEN)


def auth_entries(count: int) -> str:
    """ "1 auth entry", "2 auth entries": for log lines and `check`."""
    return f"{count} auth {'entry' if count == 1 else 'entries'}"


class _EntryBase(Model):
    url_pattern: str
    username: str = "x-access-token"
    read_only: bool = False  # refuse pushes (receive-pack, LFS locks) before any token is fetched
    push: PushPolicyConfig | None = None  # which ref updates may be pushed through this entry (all: none given)

    @field_validator("type", mode="before", check_fields=False)
    @classmethod
    def _type_upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value  # Concord reads it case-insensitively


class OAuthTokenEntry(_EntryBase):
    """A static token (a PAT, a bot token) used for every repo that `urlPattern` matches."""

    type: str = OAUTH_TOKEN  # the discriminator (AuthEntry) lets only this tag through
    id: str = "github-oauth-token"
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr) -> SecretStr:
        if not token.get_secret_value().strip():
            raise ValueError("token is empty (is the environment variable set?)")
        return SecretStr(token.get_secret_value().strip())


class GitHubAppEntry(_EntryBase):
    """A GitHub App: its private key signs a JWT, which buys installation tokens for the repos it is installed on."""

    type: str = GITHUB_APP_INSTALLATION
    id: str = "github-app-installation"
    # None: https://api.github.com for github.com, https://<upstream>/api/v3 for GitHub Enterprise Server.
    api_url: str | None = None
    client_id: str | None = None
    # GHES before 3.14 accepts only the numeric app id as the JWT issuer. Ids are strict positive integers:
    # `true` must not become 1, nor `-1` a marker.
    app_id: PositiveId | None = None
    private_key: SecretStr  # a file path, or the PEM itself; read and parsed once at start-up
    installation_id: PositiveId | None = None  # skips the installation look-up
    # Least privilege: what the minted token may do ({contents: read}, ...) and whether it covers only the repo
    # being fetched. Both become part of the cache key. readOnly without permissions asks for contents: read.
    permissions: dict[str, Literal["read", "write", "admin"]] | None = None
    scope_to_repository: bool = False

    @field_validator("permissions")
    @classmethod
    def _permissions_github_knows(cls, permissions: dict[str, str] | None) -> dict[str, str] | None:
        for name, level in (permissions or {}).items():
            problem = permission_problem(name, level)
            if problem is not None:
                raise ValueError(problem)
        return permissions

    @field_validator("private_key")
    @classmethod
    def _key_given(cls, key: SecretStr, info: ValidationInfo) -> SecretStr:
        value = key.get_secret_value()
        if not value.strip():
            raise ValueError("privateKey is empty: give the path to the app's .pem, or the PEM itself")
        file = key_file_of(value)
        if file is None or file.is_absolute():
            return key
        return SecretStr(str(from_config_folder(file, info)))

    @property
    def token_permissions(self) -> dict[str, str] | None:
        if self.permissions:  # an empty mapping asks for nothing in particular, like no mapping at all
            return dict(self.permissions)
        return {"contents": "read"} if self.read_only else None

    @field_validator("api_url")
    @classmethod
    def _api_url_without_slash(cls, url: str | None) -> str | None:
        return url.rstrip("/") if url is not None else None

    @model_validator(mode="after")
    def _has_issuer(self) -> GitHubAppEntry:
        if not self.client_id and self.app_id is None:
            raise ValueError(f"clientId or appId is required for {GITHUB_APP_INSTALLATION}")
        return self

    @model_validator(mode="after")
    def _read_only_asks_for_no_write(self) -> GitHubAppEntry:
        # readOnly refuses pushes at the proxy, but a token minted with write permissions could still push if it
        # ever left the proxy: the two settings contradict each other, and the operator should choose.
        if self.read_only:
            for name, level in (self.permissions or {}).items():
                if level != "read":
                    raise ValueError(f"readOnly is true but permissions.{name} is {level!r}")
        return self

    @property
    def issuer(self) -> str:
        """The JWT `iss`, always a string (GitHub accepts the client ID or the app ID)."""
        return self.client_id or str(self.app_id)


def _entry_type(value: Any) -> str:
    raw = value.get("type", "") if isinstance(value, Mapping) else getattr(value, "type", "")
    return str(raw).strip().upper()


UNKNOWN_TYPE = f"unknown type; use {' or '.join(ENTRY_TYPES)}"
AuthEntry = Annotated[
    Annotated[OAuthTokenEntry, Tag(OAUTH_TOKEN)] | Annotated[GitHubAppEntry, Tag(GITHUB_APP_INSTALLATION)],
    Discriminator(_entry_type, custom_error_type="unknown_type", custom_error_message=UNKNOWN_TYPE),
]


class AppInstallationConfig(Model):
    http_client_timeout: PositiveDuration = 30.0
    system_auth_cache_duration: PositiveDuration = 3000.0  # the longest a token is reused, whatever its expiry
    refresh_before: Duration = 300.0  # replace a token when less than this remains before it expires
    system_auth_cache_max_weight: int = Field(default=10_000, ge=1)
    auth: list[AuthEntry] = Field(default_factory=list)
    # Concord user secrets: {"githubAppInstallation": {...}}; the loader reads them once and appends their entries
    # to `auth` (see files.read_named_files)
    secret_files: list[Path] = Field(default_factory=list)
    # On shutdown, revoke the installation tokens this process minted (GitHub's advice for tokens no longer needed).
    # None: yes, unless cache.redis is set, since the fleet shares its tokens (see Config.revokes_on_shutdown).
    revoke_on_shutdown: bool | None = None

    @field_validator("secret_files")
    @classmethod
    def _secret_files_beside_config(cls, paths: list[Path], info: ValidationInfo) -> list[Path]:
        return [from_config_folder(path, info) for path in paths]

    @model_validator(mode="after")
    def _ids_unique(self) -> AppInstallationConfig:
        refuse_duplicate_ids(self.auth)
        return self

    def with_entries(self, entries: list[GitHubAppEntry]) -> AppInstallationConfig:
        """These settings with more entries (a secret file's) after the file's own, ids still unique."""
        auth = [*self.auth, *entries]
        refuse_duplicate_ids(auth)
        return self.model_copy(update={"auth": auth})


def refuse_duplicate_ids(entries: Sequence[OAuthTokenEntry | GitHubAppEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise ValueError(f"duplicate auth entry id {entry.id!r}; give each entry its own id")
        seen.add(entry.id)


class GitHubConfig(Model):
    app_installation: AppInstallationConfig = AppInstallationConfig()
