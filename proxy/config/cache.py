"""Cache: the fleet's shared token cache in Redis, and the Fernet keys its values are sealed with."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from pydantic import SecretStr, ValidationInfo, field_validator, model_validator

from .base import Model, from_config_folder
from .units import PositiveDuration


class RedisConfig(Model):
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
        return None if path is None else from_config_folder(path, info)

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
        if self.encryption_key is not None:
            check_fernet_keys(self.fernet_keys())  # refuse a key that is not a Fernet key now, naming the key
        return self

    def fernet_keys(self) -> list[str]:
        """Every key, the encrypting one first. A key file has been read by the loader already (see
        files.read_named_files), into `encryption_key`: nothing is read here."""
        keys = self.encryption_key if isinstance(self.encryption_key, list) else [self.encryption_key]
        return [key.get_secret_value().strip() for key in keys if key is not None]

    def with_keys(self, keys: list[str]) -> RedisConfig:
        """The same settings with the keys of `encryptionKeyFile`, as the loader read them."""
        return self.model_copy(update={"encryption_key": [SecretStr(key) for key in keys]})


def check_fernet_keys(keys: list[str]) -> None:
    """Each one a Fernet key (never echoed); at least one."""
    if not keys:
        raise ValueError("no encryption key given (is the environment variable set?)")
    for index, key in enumerate(keys):
        if not _is_fernet_key(key):
            raise ValueError(
                f"encryption key {index + 1} is not a Fernet key (32 url-safe base64 bytes); make one with "
                "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
            )


def _is_fernet_key(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode())) == 32 and len(key) == 44
    except (ValueError, binascii.Error):
        return False


class CacheConfig(Model):
    redis: RedisConfig | None = None  # absent: every replica caches on its own, and no Redis is needed
