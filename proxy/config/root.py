"""The config as a whole: every section, and the rules that span sections."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator

from .access import AccessConfig
from .auth import GitHubAppEntry, GitHubConfig, OAuthTokenEntry
from .base import Model
from .cache import CacheConfig
from .hosts import LfsConfig, TlsConfig, UpstreamConfig
from .mirror import MirrorConfig
from .push import client_name_problem
from .server import ReadinessConfig, ServerConfig


class Config(Model):
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
        self.server.refuse_unsafe_bind(self.server.host, has_clients=self.access.enabled)
        return self

    @model_validator(mode="after")
    def _push_policies_can_be_bound(self) -> Config:
        """`{client}` needs a client: refused on an entry where none can be known, and a client whose name
        cannot fill it (a '/', a character no ref holds) is refused rather than left matching nothing."""
        entry_uses_client = False
        for index, entry in enumerate(self.auth):
            if entry.push is not None and entry.push.uses_client:
                entry_uses_client = True
                if not self.access.enabled:
                    raise ValueError(
                        f"github.appInstallation.auth[{index}].push.refs: {{client}} needs access.clients or "
                        f"access.issuers (the client's name fills it); configure them, or write the refs without "
                        f"{{client}}"
                    )
        for index, client in enumerate(self.access.clients):
            if entry_uses_client or (client.push is not None and client.push.uses_client):
                problem = client_name_problem(client.name)
                if problem is not None:
                    raise ValueError(f"access.clients[{index}].name: {problem}")
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


def with_server_settings(config: Config, settings: Mapping[str, object]) -> Config:
    """The config with server settings given on the command line (validated there) in place of the file's."""
    if not settings:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=dict(settings))})
