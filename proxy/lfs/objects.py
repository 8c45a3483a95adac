"""LFS objects: where a handle's action goes on its storage host, and the SHA-256 check of what comes back."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from ..config import StorageHostConfig
from .handles import StorageAction

# What of an action's `header` map may reach the storage host: the credential, the signed headers storage services
# check, and the body's description. Found in (tests/e2e/test_lfs_hostile.py and the README name the sources):
# GitLab (Authorization, Content-Type), Gitea and lfs-test-server (Authorization, Accept), GitHub (Authorization:
# RemoteAuth; S3's Authorization with x-amz-content-sha256 and x-amz-date), giftless (x-amz-checksum-sha256,
# Azure's x-ms-blob-type), GCS's signed x-goog-* headers, and what S3, GCS and Azure let a signature cover
# (Content-MD5, Content-Encoding, Content-Language, Content-Disposition, Cache-Control, Expires).
STORAGE_HEADERS = frozenset(
    {"authorization", "accept", "content-type", "content-md5", "content-encoding", "content-language",
     "content-disposition", "cache-control", "expires"}
)  # fmt: skip
STORAGE_HEADER_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")
# Framing and hop-by-hop headers describe the transfer, which the proxy makes itself: never taken from an answer.
# GitLab puts `Transfer-Encoding: chunked` in every upload action, as a hint git-lfs reads rather than sends, so
# these are dropped, not refused: the proxy always sends the object with its own Content-Length (S3 refuses chunked
# uploads anyway).
FRAMING_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "te", "trailer", "connection", "keep-alive", "upgrade",
     "expect", "proxy-authorization", "proxy-connection", "range", "accept-encoding", "cookie"}
)  # fmt: skip


def storage_header_allowed(name: str) -> bool:
    lower = name.lower()
    return lower in STORAGE_HEADERS or (lower.startswith(STORAGE_HEADER_PREFIXES) and lower not in FRAMING_HEADERS)


def storage_request_headers(action: StorageAction, content_type: str | None, length: int | None) -> dict[str, str]:
    """The request to the storage host, built by the proxy: the action's allowed headers, the body's type (an
    upload's, when the action names none), and a Content-Length the proxy verifies. Nothing else of the client's,
    and nothing of ours: the storage credential is the action's own."""
    headers = {name: value for name, value in action.headers if storage_header_allowed(name)}
    if content_type is not None and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = content_type
    if length is not None:
        headers["Content-Length"] = str(length)
    return headers


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
