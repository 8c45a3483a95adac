"""Configuration: pydantic models for the YAML file, and the loader that turns mistakes into one readable line."""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import ipaddress
import json
import os
import re
import ssl
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .bounded_yaml import YamlRefused, load_bounded_yaml
from .files import read_regular_file
from .github_permissions import permission_problem
from .pem import key_file_of


class ConfigError(Exception):
    """A config problem the operator can fix; the message names the key."""


# ---------------------------------------------------------------- durations

_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_duration(value: Any) -> float:
    """Seconds from `30s`, `50m`, `1h30m`, Concord's `"50 minutes"`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 50m or '50 minutes'")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 50m or '50 minutes'")
    text = value.strip().lower()
    total, position = 0.0, 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if not part or part.end() == position or part.group(2) not in _DURATION_UNITS | {"": 1}:
            raise ValueError(f"{value!r} is not a duration; use e.g. 30s, 50m, 1h or '50 minutes'")
        total += float(part.group(1)) * _DURATION_UNITS.get(part.group(2), 1)
        position = part.end()
    if position == 0:
        raise ValueError("empty duration")
    return total


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveId = Annotated[int, Field(strict=True, gt=0, lt=2**63)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]


def _from_config_folder(path: Path, info: ValidationInfo) -> Path:
    """A relative path in a config file names a file beside that file, wherever the proxy was started from: the
    same file then works from a shell, a systemd unit and a container alike."""
    path = path.expanduser()
    folder = info.context.get("config_folder") if isinstance(info.context, dict) else None
    return folder / path if isinstance(folder, Path) and not path.is_absolute() else path


# ---------------------------------------------------------------- models


class _Model(BaseModel):
    # camelCase keys as in Concord; unknown keys are errors, so a typo never silently does nothing.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Without access.clients, anyone who can reach the port uses the tokens: only loopback is allowed by default.
    allow_unauthenticated: bool = False
    # A request's headers must be complete this long after the connection opened (or the last response): a client
    # dribbling bytes (slowloris) is cut off. Also the idle timeout of keep-alive connections.
    header_timeout: PositiveDuration = 15.0
    # Concurrent connections to upstreams, all hosts together; requests beyond it wait for a free one.
    max_upstream_connections: int = Field(default=512, ge=1)
    # On SIGTERM: stop accepting, let transfers finish for this long, then exit.
    shutdown_grace: PositiveDuration = 30.0
    # On SIGTERM, keep accepting this long first, with /readyz at 503 "draining" (on the git port too), so that a
    # load balancer stops sending new clones before the listener closes. 0: close at once.
    drain_delay: Duration = 0.0
    # /metrics, /healthz and /readyz on a port of their own (which stays up while git traffic drains).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str | None = None  # default: server.host
    # Host names (with or without :port) that clients may use besides loopback ones: a request whose Host header
    # names anything else is refused, so a web page cannot reach the proxy through DNS rebinding.
    allowed_hosts: list[str] = []
    # A client that reads nothing of its response for this long has its transfer aborted on both sides, so that a
    # stuck client cannot hold an upstream connection for ever.
    write_timeout: PositiveDuration = 300.0
    # A request body still arriving must average at least this many bytes a second over each 30 s (or writeTimeout,
    # if shorter): a client dripping a byte now and then is never quiet for writeTimeout, but would hold an upstream
    # connection for as long as it likes. 0: no floor.
    min_body_rate: Annotated[int, BeforeValidator(parse_size), Field(ge=0)] = 1024

    def refuse_unsafe_bind(self, host: str, has_clients: bool) -> None:
        if has_clients or self.allow_unauthenticated or is_loopback(host):
            return
        raise ConfigError(
            f"server.host {host!r} is not a loopback address and access.clients is empty: every process that can "
            "reach it could use this proxy's GitHub tokens. Configure access.clients, or set "
            "server.allowUnauthenticated: true if the network itself is the boundary (e.g. a pod's own interface)."
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$")


class _HostConfig(_Model):
    """A host the proxy may connect to, and where it really is."""

    host: str
    url: str = ""  # empty means https://<host>; filled in by the validator below
    connect_timeout: PositiveDuration = 10.0
    # Between two reads, not for the whole transfer: a large clone may take an hour and must not be cut off.
    read_timeout: PositiveDuration = 300.0

    @field_validator("host")
    @classmethod
    def _host_is_plain(cls, host: str) -> str:
        host = host.strip().lower()
        if not _HOST_RE.match(host):
            raise ValueError(f"{host!r} is not a plain host[:port] (no scheme, path or user)")
        return host

    @model_validator(mode="after")
    def _default_url(self) -> Self:
        url = (self.url or f"https://{self.host}").rstrip("/")
        if not re.match(r"^https?://[^/@\s?#]+(/[^\s?#@]*)?$", url):
            shown = re.sub(r"//[^/]*@", "//<credentials removed>@", url)  # never echo a token someone pasted
            raise ValueError(f"url {shown!r} must be http(s)://host[:port][/path], without credentials or query")
        object.__setattr__(self, "url", url)
        return self


class UpstreamConfig(_HostConfig):
    """A git host the proxy may connect to. Nothing else is ever contacted for git traffic."""

    anonymous: bool = True


class StorageHostConfig(_HostConfig):
    """An LFS storage host: treated like an upstream (TLS settings, timeouts), but it never receives a token of
    ours, only the credential its own batch answer named."""


# Where GitHub keeps LFS objects: the hosts GitHub's docs list as "Needed for Git Large File Storage" in
# https://docs.github.com/en/actions/concepts/runners/communicating-with-self-hosted-runners
GITHUB_LFS_STORAGE_HOSTS = ("github-cloud.githubusercontent.com", "github-cloud.s3.amazonaws.com")


class LfsConfig(_Model):
    # true: download/upload/verify actions on a storage host go through this proxy, under handles of its own,
    # and the client never sees a storage URL or credential. false: batch answers pass as they came.
    proxy_objects: bool = False
    storage_hosts: list[StorageHostConfig] = Field(
        default_factory=lambda: [StorageHostConfig(host=host) for host in GITHUB_LFS_STORAGE_HOSTS]
    )

    @model_validator(mode="after")
    def _hosts_unique(self) -> LfsConfig:
        hosts = [h.host for h in self.storage_hosts]
        duplicates = {h for h in hosts if hosts.count(h) > 1}
        if duplicates:
            raise ValueError(f"storage host listed twice: {', '.join(sorted(duplicates))}")
        return self


class TlsConfig(_Model):
    ca_file: Path | None = None

    @field_validator("ca_file")
    @classmethod
    def _ca_file_is_readable(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        # OpenSSL reads it later, at start-up: a missing file or one without a certificate would surface as a
        # traceback there, and a FIFO or /dev/zero would hang start-up. Checked here, the message names the key.
        if path is not None:
            path = _from_config_folder(path, info)
            try:
                data = read_regular_file(path, CA_FILE_MAX_BYTES)
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot read {path}: {_read_problem(error)}") from None
            _require_certificates(path, data)
        return path


def _require_certificates(path: Path, data: bytes) -> None:
    """Raises ValueError unless OpenSSL finds at least one certificate in `data`, as it will when it loads it."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode())
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def with_server_settings(config: Config, settings: Mapping[str, object]) -> Config:
    """The config with server settings given on the command line (validated there) in place of the file's."""
    if not settings:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=dict(settings))})


def auth_entries(count: int) -> str:
    """ "1 auth entry", "2 auth entries": for log lines and `check`."""
    return f"{count} auth {'entry' if count == 1 else 'entries'}"


class _EntryBase(_Model):
    url_pattern: str
    username: str = "x-access-token"
    read_only: bool = False  # refuse pushes (receive-pack, LFS locks) before any token is fetched

    @field_validator("type", mode="before", check_fields=False)
    @classmethod
    def _type_upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value  # Concord reads it case-insensitively


class OAuthTokenEntry(_EntryBase):
    """A static token (a PAT, a bot token) used for every repo that `urlPattern` matches."""

    type: Literal["OAUTH_TOKEN"] = "OAUTH_TOKEN"
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

    type: Literal["GITHUB_APP_INSTALLATION"] = "GITHUB_APP_INSTALLATION"
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
        return SecretStr(str(_from_config_folder(file, info)))

    @property
    def token_permissions(self) -> dict[str, str] | None:
        if self.permissions:  # an empty mapping asks for nothing in particular, like no mapping at all
            return dict(self.permissions)
        return {"contents": "read"} if self.read_only else None

    @model_validator(mode="after")
    def _has_issuer(self) -> GitHubAppEntry:
        if not self.client_id and self.app_id is None:
            raise ValueError("clientId or appId is required for GITHUB_APP_INSTALLATION")
        if self.api_url is not None:
            object.__setattr__(self, "api_url", self.api_url.rstrip("/"))
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


AuthEntry = Annotated[
    Annotated[OAuthTokenEntry, Tag("OAUTH_TOKEN")] | Annotated[GitHubAppEntry, Tag("GITHUB_APP_INSTALLATION")],
    Discriminator(_entry_type, custom_error_type="unknown_type",
                  custom_error_message="unknown type; use GITHUB_APP_INSTALLATION or OAUTH_TOKEN"),
]  # fmt: skip


class AppInstallationConfig(_Model):
    http_client_timeout: PositiveDuration = 30.0
    system_auth_cache_duration: PositiveDuration = 3000.0  # the longest a token is reused, whatever its expiry
    refresh_before: Duration = 300.0  # replace a token when less than this remains before it expires
    system_auth_cache_max_weight: int = Field(default=10_000, ge=1)
    auth: list[AuthEntry] = []
    secret_files: list[Path] = []  # Concord user secrets: {"githubAppInstallation": {...}}, appended to `auth`
    # On shutdown, revoke the installation tokens this process minted (GitHub's advice for tokens no longer needed).
    # None: yes, unless cache.redis is set, since the fleet shares its tokens (see Config.revokes_on_shutdown).
    revoke_on_shutdown: bool | None = None

    @field_validator("secret_files")
    @classmethod
    def _secret_files_beside_config(cls, paths: list[Path], info: ValidationInfo) -> list[Path]:
        return [_from_config_folder(path, info) for path in paths]

    @model_validator(mode="after")
    def _append_secret_files(self) -> AppInstallationConfig:
        entries = [_load_secret_file(index, path) for index, path in enumerate(self.secret_files)]
        object.__setattr__(self, "auth", [*self.auth, *entries])
        return self

    @model_validator(mode="after")
    def _ids_unique(self) -> AppInstallationConfig:
        seen: set[str] = set()
        for entry in self.auth:
            if entry.id in seen:
                raise ValueError(f"duplicate auth entry id {entry.id!r}; give each entry its own id")
            seen.add(entry.id)
        return self


def _load_secret_file(index: int, path: Path) -> GitHubAppEntry:
    """A Concord user secret: JSON whose `githubAppInstallation` holds the entry, with the PEM inline."""
    where = f"secretFiles[{index}] ({path})"
    try:
        raw = read_regular_file(path, SECRET_FILE_MAX_BYTES)
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte in it
        raise ValueError(f"{where}: cannot read: {_read_problem(error)}") from None
    try:
        data = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not valid UTF-8") from None
    except ValueError as error:
        raise ValueError(f"{where}: not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON: nested too deeply") from None
    fields = data.get("githubAppInstallation") if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'githubAppInstallation' object")
    fields = {"id": f"secret:{path.stem}", **fields, "type": "GITHUB_APP_INSTALLATION"}
    try:
        return GitHubAppEntry.model_validate(fields)
    except ValidationError as error:
        raise ValueError(f"{where}: {_describe(error).replace(chr(10), '; ')}") from None


class GitHubConfig(_Model):
    app_installation: AppInstallationConfig = AppInstallationConfig()


class ReadinessConfig(_Model):
    # /readyz also needs a recent successful GET /app for every app entry.
    check_github: bool = Field(default=False, alias="checkGitHub")
    interval: PositiveDuration = 60.0  # how often that check runs
    max_age: PositiveDuration = 300.0  # how recent a success must be


class AccessClient(_Model):
    """A client of this proxy: its own secret, the repos it may reach, and whether it may push."""

    name: str
    token: SecretStr | None = None
    token_sha256: str | None = None  # hex SHA-256 of the token, so the config file holds no secret
    repos: list[str] = Field(min_length=1)  # regexes like urlPattern, matched as prefixes of host/owner/repo
    read_only: bool = False

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


class AccessConfig(_Model):
    clients: list[AccessClient] = []

    @model_validator(mode="after")
    def _names_unique(self) -> AccessConfig:
        names = [client.name for client in self.clients]
        if len(set(names)) != len(names):
            raise ValueError("access.clients: every client needs its own name")
        return self


class RedisConfig(_Model):
    """A Redis (or Valkey, ElastiCache, Memorystore) shared by every replica: one token per installation for the
    whole fleet. An accelerator only: while it is away, each replica serves from its own cache."""

    url: str  # redis://[user:password@]host:port/db, rediss:// for TLS (tls.caFile applies), unix:///path.sock
    key_prefix: str = "git-token-proxy"  # several fleets can share one Redis
    # A Fernet key (32 url-safe base64 bytes), or a list of them: the first encrypts, all decrypt (rotation).
    encryption_key: SecretStr | list[SecretStr] | None = None
    encryption_key_file: Path | None = None  # the same, one key per line
    connect_timeout: PositiveDuration = 1.0  # also the budget of one Redis call

    @field_validator("url")
    @classmethod
    def _url_is_redis(cls, url: str) -> str:
        if not re.match(r"^(rediss?|unix)://\S+$", url):
            shown = re.sub(r"//[^/@]*@", "//<credentials removed>@", url)
            raise ValueError(f"url {shown!r} must start with redis://, rediss:// or unix://")
        return url

    @field_validator("encryption_key_file")
    @classmethod
    def _key_file_beside_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _from_config_folder(path, info)

    @field_validator("key_prefix")
    @classmethod
    def _prefix_is_plain(cls, prefix: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", prefix):
            raise ValueError("keyPrefix must be 1-64 characters of letters, digits and . _ : -")
        return prefix

    @model_validator(mode="after")
    def _one_key_source(self) -> RedisConfig:
        if (self.encryption_key is None) == (self.encryption_key_file is None):
            raise ValueError("give exactly one of encryptionKey and encryptionKeyFile: values in Redis are encrypted")
        self.fernet_keys()  # refuse a key that is not a Fernet key now, naming the key
        return self

    def fernet_keys(self) -> list[str]:
        """Every key, the encrypting one first; each checked to be a Fernet key (never echoed)."""
        if self.encryption_key_file is not None:
            try:
                text = read_regular_file(self.encryption_key_file, SECRET_FILE_MAX_BYTES).decode()
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot read {self.encryption_key_file}: {_read_problem(error)}") from None
            keys = [line.strip() for line in text.splitlines() if line.strip()]
        elif isinstance(self.encryption_key, list):
            keys = [key.get_secret_value().strip() for key in self.encryption_key]
        else:
            assert self.encryption_key is not None
            keys = [self.encryption_key.get_secret_value().strip()]
        if not keys:
            raise ValueError("no encryption key given (is the environment variable set?)")
        for index, key in enumerate(keys):
            if not _is_fernet_key(key):
                raise ValueError(
                    f"encryption key {index + 1} is not a Fernet key (32 url-safe base64 bytes); make one with "
                    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
                )
        return keys


def _is_fernet_key(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode())) == 32 and len(key) == 44
    except (ValueError, binascii.Error):
        return False


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kib|mib|gib|tib|kb|mb|gb|tb)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip


def parse_size(value: Any) -> int:
    """Bytes from `20GiB`, `500MiB`, `10GB` or a bare number of bytes."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a size such as 10GiB or 500MiB")
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError("not a size; use e.g. 10GiB, 500MiB or 20GB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


class MirrorConfig(_Model):
    """Repeat clones come from a local bare mirror per repo; refs and authorization still come from upstream."""

    dir: Path  # one bare mirror per upstream repo under it, laid out by host/owner/repo
    max_size: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 10 * (1 << 30)  # LRU eviction of whole repos
    repos: list[str] = []  # regexes like access.clients' repos, matched against host/owner/repo; empty: every repo
    # A pack is served from the mirror only while an upstream answer less than this old proves that the credential
    # can read the repo (and no refusal came since); otherwise upstream is asked first.
    auth_ttl: PositiveDuration = 60.0
    # Pack requests are read whole so that the mirror can answer them; all of them together hold at most this much.
    # One that does not fit (or is over 16 MiB, or slow) goes upstream as it comes, as it would without a mirror.
    max_held_bodies: Annotated[int, BeforeValidator(parse_size), Field(gt=0)] = 64 * (1 << 20)


class CacheConfig(_Model):
    redis: RedisConfig | None = None  # absent: every replica caches on its own, and no Redis is needed


class Config(_Model):
    server: ServerConfig = ServerConfig()
    access: AccessConfig = AccessConfig()
    readiness: ReadinessConfig = ReadinessConfig()
    upstreams: list[UpstreamConfig] = Field(default_factory=lambda: [UpstreamConfig(host="github.com")])
    tls: TlsConfig = TlsConfig()
    github: GitHubConfig = GitHubConfig()
    cache: CacheConfig = CacheConfig()
    mirror: MirrorConfig | None = None  # absent: pure pass-through
    lfs: LfsConfig = LfsConfig()

    @property
    def auth(self) -> list[OAuthTokenEntry | GitHubAppEntry]:
        return self.github.app_installation.auth

    @property
    def revokes_on_shutdown(self) -> bool:
        chosen = self.github.app_installation.revoke_on_shutdown
        return chosen if chosen is not None else self.cache.redis is None

    @model_validator(mode="after")
    def _revoke_only_what_is_ours(self) -> Config:
        if self.github.app_installation.revoke_on_shutdown and self.cache.redis is not None:
            raise ValueError(
                "github.appInstallation.revokeOnShutdown: true with cache.redis would revoke tokens the whole fleet "
                "shares whenever one replica stops; remove revokeOnShutdown (with cache.redis it defaults to false)"
            )
        return self

    @property
    def secrets(self) -> list[str]:
        """Every secret written in the config itself, for the log redactor (keys are redacted by shape)."""
        tokens = [e.token.get_secret_value() for e in self.auth if isinstance(e, OAuthTokenEntry)]
        clients = [c.token.get_secret_value() for c in self.access.clients if c.token is not None]
        redis = self.cache.redis
        shared = [*redis.fernet_keys(), *_url_password(redis.url)] if redis else []
        return tokens + clients + shared

    @model_validator(mode="after")
    def _bind_is_safe(self) -> Config:
        self.server.refuse_unsafe_bind(self.server.host, has_clients=bool(self.access.clients))
        return self

    @model_validator(mode="after")
    def _upstreams_unique(self) -> Config:
        hosts = [u.host for u in self.upstreams]
        duplicates = {h for h in hosts if hosts.count(h) > 1}
        if duplicates:
            raise ValueError(f"upstream host listed twice: {', '.join(sorted(duplicates))}")
        return self


def _url_password(url: str) -> list[str]:
    password = urlsplit(url).password
    return [unquote(password)] if password else []


# ---------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class _FromEnvironment:
    """What `${VAR}` expansion took from the environment, for messages: `values` maps each value to its variable
    (so that no message echoes one), `empty` maps a key's location to the variable that was set but empty."""

    values: dict[str, str] = field(default_factory=dict)
    empty: dict[str, str] = field(default_factory=dict)


def _expand_env(value: Any, location: str, taken: _FromEnvironment) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string; a missing variable names its key."""
    if isinstance(value, str):

        def substitute(ref: re.Match[str]) -> str:
            name, default = ref.group(1), ref.group(2)
            if name in os.environ:
                taken.values[os.environ[name]] = name
                if not os.environ[name].strip():
                    taken.empty[location] = name
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{location}: environment variable {name} is not set")

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{location}.{k}" if location else str(k), taken) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{location}[{i}]", taken) for i, v in enumerate(value)]
    return value


def _hide_environment(message: str, used: dict[str, str]) -> str:
    """A validator may quote the value it refused; when that value came from the environment, it may be any
    secret of the pod (a key put where a duration belongs): the message names the variable instead."""
    for value in sorted(used, key=len, reverse=True):
        if len(value) >= 3:
            message = message.replace(value, f"<value of ${{{used[value]}}}>")
    return message


def _format_location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("OAUTH_TOKEN", "GITHUB_APP_INSTALLATION"):
            continue  # the discriminator tag pydantic puts in the path; the user never wrote it
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _closest_key(loc: tuple[int | str, ...]) -> str:
    """`server.prot` → "; did you mean 'port'?": the keys of the model at that place, by difflib (case folded, so
    `clientID` finds `clientId`)."""
    keys = _keys_at(Config, loc[:-1])
    given = str(loc[-1])
    by_folded = {key.casefold(): key for key in keys}
    close = difflib.get_close_matches(given.casefold(), list(by_folded), n=1, cutoff=0.6)
    return f"; did you mean {by_folded[close[0]]!r}?" if close else ""


def _keys_at(annotation: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The keys (aliases) of the model found by following `loc` from `annotation`; [] when none is there."""
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    for member in _members(annotation):
        model = _model_in(member)
        if model is not None:
            return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _step(annotation: Any, part: int | str) -> Any:
    """One step down a location: an item of a list, a field of a model, or a tagged member of a union."""
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if isinstance(part, int) and origin in (list, tuple):
            return typing.get_args(member)[0]
        model = _model_in(member)
        if model is not None and isinstance(part, str):
            for name, field in model.model_fields.items():
                if part in (name, field.alias):
                    return field.annotation
        tag = next((m for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)), None)
        if tag is not None and tag.tag == part:
            return member
    return None


def _members(annotation: Any) -> list[Any]:
    """A union's members (Annotated wrappers kept: they carry the discriminator's tags), or the one type."""
    inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        return list(typing.get_args(inner))
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _describe(error: ValidationError, empty: Mapping[str, str] | None = None) -> str:
    lines = []
    for item in error.errors():
        location = _format_location(item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _closest_key(item["loc"])
        elif item["type"] == "unknown_type":
            given = item["input"].get("type") if isinstance(item["input"], Mapping) else None
            message = f"unknown type {given!r}; use GITHUB_APP_INSTALLATION or OAUTH_TOKEN"
            if not isinstance(item["input"], Mapping):
                message = "each auth entry must be a mapping of keys (id, type, urlPattern, ...)"
        message = message.removeprefix("Value error, ")
        if empty and location in empty:
            message += f" (${{{empty[location]}}} is set but empty)"
        lines.append(f"{location}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config", config_folder: Path | None = None) -> Config:
    """Validate already-loaded YAML data; every problem is one line naming its key. Relative file paths in it
    name files in `config_folder` (the config file's own folder)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    taken = _FromEnvironment()
    try:
        return Config.model_validate(_expand_env(data, "", taken), context={"config_folder": config_folder})
    except ConfigError as error:
        raise ConfigError(_hide_environment(f"{source}: {error}", taken.values)) from None
    except ValidationError as error:
        described = _describe(error, taken.empty)
        # One mistake, one line; several get a line each, under a heading.
        separator = ": " if "\n" not in described else "\n"
        message = f"{source}: invalid configuration{separator}{described}"
        raise ConfigError(_hide_environment(message, taken.values)) from None


_DOUBLE_QUOTED_REGEX_HINT = (
    "; in double quotes YAML reads backslashes itself: write patterns in single quotes, "
    "'(?<baseUrl>github\\.com)/.*', or double each backslash"
)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The problem and its position only: PyYAML's own message quotes the offending line, which may hold a token."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)
    # `"(?<baseUrl>github\.com)"` is the likeliest way to meet this: a regex escape inside a double-quoted string.
    return where + (_DOUBLE_QUOTED_REGEX_HINT if "unknown escape character" in str(problem) else "")


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file. Whatever the file holds, this takes bounded time and memory and
    fails only with a ConfigError naming the file: `--watch` and SIGHUP load whatever lands at that path."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        data = load_bounded_yaml(text)
    except YamlRefused as error:
        raise ConfigError(f"{path}: refused: {_yaml_problem(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except (ValueError, OverflowError):
        # PyYAML converts a date such as 2024-13-45, or an integer of thousands of digits, with Python's own
        # constructors; their messages are not PyYAML's, so say plainly what kind of value it is.
        raise ConfigError(f"{path}: not valid YAML: a number or date is out of range") from None
    return parse_config(data, str(path), path.absolute().parent)


def _read_config_text(path: Path) -> str:
    try:
        raw = read_regular_file(path, CONFIG_MAX_BYTES)
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte in it
        raise ConfigError(f"{path}: cannot read config file: {_read_problem(error)}") from None
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8: byte {raw[error.start]:#04x} at offset {error.start}") from None


# ---------------------------------------------------------------- bounded reading

# A config, a secret file or a key file may be replaced by anything (a FIFO, /dev/zero, a 50 GiB file) while the
# proxy runs, and --watch reads them every few seconds: every read is bounded, and only regular files are read.
CONFIG_MAX_BYTES = 1024 * 1024
SECRET_FILE_MAX_BYTES = 64 * 1024  # a Concord secret is a few fields and one PEM of 2-4 KiB
CA_FILE_MAX_BYTES = 16 * 1024 * 1024  # a CA bundle; the system one is about 200 KiB


def _read_problem(error: OSError | ValueError) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)
