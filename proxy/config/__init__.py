"""Configuration: the YAML file's models, by section, and the loader that turns mistakes into one readable line.

`units` (durations, sizes) and `base` (the model every section shares) come first; then one module per section
(`server`, `hosts`, `auth`, `access`, `cache`, `mirror`) and `root`, the file as a whole; `files` reads what the
config names, once, after validation; `load` reads the file and says what is wrong; `environment` is the config
`serve` runs without a file, from GIT_TOKEN_PROXY_* variables."""

from .access import AccessClient, AccessConfig
from .auth import (
    GITHUB_APP_INSTALLATION,
    OAUTH_TOKEN,
    AppInstallationConfig,
    AuthEntry,
    GitHubAppEntry,
    GitHubConfig,
    OAuthTokenEntry,
    auth_entries,
)
from .base import ConfigError
from .cache import CacheConfig, RedisConfig
from .files import CONFIG_MAX_BYTES
from .hosts import GITHUB_LFS_STORAGE_HOSTS, LfsConfig, StorageHostConfig, TlsConfig, UpstreamConfig
from .load import load_config, parse_config
from .mirror import MirrorConfig
from .root import Config, with_server_settings
from .server import ReadinessConfig, ServerConfig, is_loopback
from .units import parse_duration, parse_size

__all__ = [
    "CONFIG_MAX_BYTES", "GITHUB_APP_INSTALLATION", "GITHUB_LFS_STORAGE_HOSTS", "OAUTH_TOKEN", "AccessClient",
    "AccessConfig", "AppInstallationConfig", "AuthEntry", "CacheConfig", "Config", "ConfigError", "GitHubAppEntry",
    "GitHubConfig", "LfsConfig", "MirrorConfig", "OAuthTokenEntry", "ReadinessConfig", "RedisConfig",
    "ServerConfig", "StorageHostConfig", "TlsConfig", "UpstreamConfig", "auth_entries", "is_loopback",
    "load_config", "parse_config", "parse_duration", "parse_size", "with_server_settings",
]  # fmt: skip
