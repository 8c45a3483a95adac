"""LFS objects: where a handle's action goes on its storage host, and the SHA-256 check of what comes back."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from ..config import StorageHostConfig
from ..errors import ProxyError
from .handles import StorageAction


class StorageRefused(ProxyError):
    """The storage host answered a handle's request with anything but success (its body is not passed on: an
    S3 error quotes the signature it refused)."""


def storage_url(action: StorageAction, storage: StorageHostConfig) -> str:
    """The href's path and query (its signature) on the storage host's configured URL: the proxy connects only
    where the operator said the host is, whatever the href's scheme or address."""
    parts = urlsplit(action.href)
    return storage.url + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class DigestCheck:
    """A download is the object whose name is its SHA-256, or nothing: hashed as it streams, judged at the end."""

    def __init__(self, oid: str, size: int) -> None:
        self._oid, self._size = oid, size
        self._sha256 = hashlib.sha256()
        self.received = 0

    def update(self, chunk: bytes) -> bool:
        """False once more bytes came than the object has."""
        self.received += len(chunk)
        self._sha256.update(chunk)
        return self.received <= self._size

    def matches(self) -> bool:
        return self.received == self._size and self._sha256.hexdigest() == self._oid
