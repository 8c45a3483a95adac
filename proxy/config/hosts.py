"""Hosts: the upstreams (git hosts) and LFS storage hosts the proxy may connect to, and the TLS it trusts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .base import Model, from_config_folder
from .units import PositiveDuration

_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$")


class _HostConfig(Model):
    """A host the proxy may connect to, and where it really is."""

    host: str
    url: str = ""  # empty means https://<host>: filled in before validation, from the host as written
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

    @model_validator(mode="before")
    @classmethod
    def _default_url(cls, data: Any) -> Any:
        """A plain host without a url is served at https://<host>. (A host that is not plain gets its own error,
        and no second one about a url nobody wrote.)"""
        if isinstance(data, dict) and not data.get("url") and isinstance(data.get("host"), str):
            host = data["host"].strip().lower()
            if _HOST_RE.match(host):
                return {**data, "url": f"https://{host}"}
        return data

    @field_validator("url")
    @classmethod
    def _url_is_plain(cls, url: str) -> str:
        url = url.rstrip("/")
        if url and not re.match(r"^https?://[^/@\s?#]+(/[^\s?#@]*)?$", url):
            shown = re.sub(r"//[^/]*@", "//<credentials removed>@", url)  # never echo a token someone pasted
            raise ValueError(f"url {shown!r} must be http(s)://host[:port][/path], without credentials or query")
        return url


class UpstreamConfig(_HostConfig):
    """A git host the proxy may connect to. Nothing else is ever contacted for git traffic."""

    anonymous: bool = True


class StorageHostConfig(_HostConfig):
    """An LFS storage host: treated like an upstream (TLS settings, timeouts), but it never receives a token of
    ours, only the credential its own batch answer named."""


# Where GitHub keeps LFS objects: the hosts GitHub's docs list as "Needed for Git Large File Storage" in
# https://docs.github.com/en/actions/concepts/runners/communicating-with-self-hosted-runners
GITHUB_LFS_STORAGE_HOSTS = ("github-cloud.githubusercontent.com", "github-cloud.s3.amazonaws.com")


class LfsConfig(Model):
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


class TlsConfig(Model):
    # A CA bundle to trust besides the system's (a GHES with a private CA, a TLS-intercepting egress). The loader
    # reads it once (see files.check_ca_file), so that a bad one is a line naming the key, not a start-up traceback.
    ca_file: Path | None = None

    @field_validator("ca_file")
    @classmethod
    def _ca_file_beside_config(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else from_config_folder(path, info)
