"""LFS batch answers: storage hrefs and their credentials replaced by /_lfs/ handles on this proxy."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp

from ..bodies import inflate_bounded
from ..config import LfsConfig, StorageHostConfig
from ..errors import UpstreamBadResponse
from ..routing import Route
from .handles import MAX_TTL, HandleStore, StorageAction
from .objects import storage_header_allowed

# A batch answer lists hrefs for at most a few hundred objects; after decompression it stays far below this.
BATCH_ANSWER_LIMIT = 1024 * 1024
_METHODS = {"download": "GET", "upload": "PUT", "verify": "POST"}
_OID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LfsPolicy:
    """lfs.proxyObjects on: the storage hosts, by the host[:port] that hrefs name."""

    storage_hosts: Mapping[str, StorageHostConfig]
    dropped_headers_logged: set[str] = field(default_factory=set, compare=False)  # see forward._note_dropped_headers

    @classmethod
    def from_config(cls, config: LfsConfig) -> LfsPolicy | None:
        if not config.proxy_objects:
            return None
        return cls({host.host: host for host in config.storage_hosts})

    def storage_host_of(self, href: str) -> StorageHostConfig | None:
        try:
            parts = urlsplit(href)
            port = parts.port
        except ValueError:
            return None
        if parts.scheme not in ("https", "http") or parts.username is not None or not parts.hostname:
            return None
        default = 443 if parts.scheme == "https" else 80
        hostname = parts.hostname.removesuffix(".")  # `host.` is the same DNS name
        key = hostname if port in (None, default) else f"{hostname}:{port}"
        return self.storage_hosts.get(key.lower())


@dataclass
class Rewritten:
    body: bytes
    rewritten: dict[str, int]  # by action
    passed: int  # actions on other hosts, passed on untouched
    dropped: list[str] = field(default_factory=list)  # names of action headers storage is not sent


async def read_batch_answer(upstream: aiohttp.ClientResponse) -> bytes:
    """The whole answer, bounded before and after decompression (the session keeps bodies as they came)."""
    raw = bytearray()
    async for chunk in upstream.content.iter_any():
        raw += chunk
        if len(raw) > BATCH_ANSWER_LIMIT:
            raise UpstreamBadResponse(f"LFS batch answer over {BATCH_ANSWER_LIMIT} bytes")
    body = inflate_bounded(bytes(raw), upstream.headers.get("Content-Encoding"), BATCH_ANSWER_LIMIT)
    if body is None:
        raise UpstreamBadResponse(
            f"LFS batch answer in an encoding the proxy cannot read, corrupt, or over {BATCH_ANSWER_LIMIT} bytes"
        )
    return body


def rewrite_batch_answer(
    body: bytes, policy: LfsPolicy, handles: HandleStore, route: Route, client: str | None, proxy_base: str
) -> Rewritten:
    """Each action on a storage host gets an href on this proxy (`proxy_base`/_lfs/<handle>) and loses its
    `header`: the storage credential stays in the handle. Anything the proxy cannot vouch for is refused whole,
    rather than passed on with a credential in it."""
    try:
        document = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise UpstreamBadResponse("LFS batch answer is not JSON") from None
    objects = document.get("objects") if isinstance(document, dict) else None
    if not isinstance(objects, list):
        raise UpstreamBadResponse("LFS batch answer has no objects list")
    result = Rewritten(b"", {}, 0)
    for item in objects:
        actions = item.get("actions") if isinstance(item, dict) else None
        if not isinstance(actions, dict):
            continue  # an error, or nothing to transfer
        for name, action in actions.items():
            href = action.get("href") if isinstance(action, dict) else None
            if not isinstance(href, str):
                raise UpstreamBadResponse(f"LFS batch answer: action {name[:20]!r} has no href")
            storage = policy.storage_host_of(href)
            if storage is None or name not in _METHODS:
                # Not a storage host of ours: passed on, but never with a credential. The sandbox may not reach
                # it anyway; if it can, that host's own authentication (or a signed href) is all it gets.
                if isinstance(action, dict):
                    action.pop("header", None)
                result.passed += 1
                continue
            assert isinstance(action, dict)
            handle = handles.issue(_storage_action(name, action, item, storage, route, client, result.dropped))
            action["href"] = f"{proxy_base}/_lfs/{handle}"
            action.pop("header", None)
            result.rewritten[name] = result.rewritten.get(name, 0) + 1
    result.body = json.dumps(document, separators=(",", ":")).encode()
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python reads them, git-lfs would not


# A signed href is a few hundred bytes to a couple of KiB, its headers less: a handle keeps them, so they are capped
# (a hostile batch API must not make each of the store's handles hold a megabyte).
MAX_HREF = 16 * 1024
MAX_HEADERS = 16 * 1024
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def _storage_action(
    name: str, action: dict[str, object], item: dict[str, object], storage: StorageHostConfig, route: Route,
    client: str | None, dropped: list[str],
) -> StorageAction:  # fmt: skip
    oid, size = item.get("oid"), item.get("size")
    if not isinstance(oid, str) or not _OID.fullmatch(oid) or type(size) is not int or size < 0:
        raise UpstreamBadResponse("LFS batch answer: an object without a SHA-256 oid and a size")
    return StorageAction(
        name, _METHODS[name], str(action["href"]), _storage_headers(action, dropped), storage.host, oid, size, route,
        client, time.monotonic() + _ttl(action),
    )  # fmt: skip


def _storage_headers(action: dict[str, object], dropped: list[str]) -> tuple[tuple[str, str], ...]:
    """The action's headers that may reach storage (lfs.objects.STORAGE_HEADERS); the names of the others go to
    `dropped`. A header named twice (in any case) is no single instruction, and is refused with the answer."""
    header = action.get("header") or {}
    if not isinstance(header, dict) or not all(isinstance(v, str) for v in header.values()):
        raise UpstreamBadResponse("LFS batch answer: an action header that is not a map of strings")
    # fullmatch: `$` alone also matches before a final newline, which would let "x-amz-date\n" through.
    if not all(_HEADER_NAME.fullmatch(str(k)) and _HEADER_VALUE.fullmatch(v) for k, v in header.items()):
        raise UpstreamBadResponse("LFS batch answer: an action header with characters no header may hold")
    if len(str(action["href"])) > MAX_HREF or sum(len(str(k)) + len(v) for k, v in header.items()) > MAX_HEADERS:
        raise UpstreamBadResponse("LFS batch answer: an action href or header too long to keep")
    if len({str(name).lower() for name in header}) != len(header):
        raise UpstreamBadResponse("LFS batch answer: an action header named twice")
    kept = tuple((str(name), value) for name, value in header.items() if storage_header_allowed(str(name)))
    dropped.extend(str(name) for name in header if not storage_header_allowed(str(name)))
    return kept


def _ttl(action: Mapping[str, object]) -> float:
    """Seconds the action stays valid: the sooner of expires_in and expires_at, capped at MAX_TTL."""
    ttl = MAX_TTL
    expires_in = action.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in != 0:
        ttl = min(ttl, max(-1.0, min(float(MAX_TTL), expires_in)))  # 0 means "not given" in git-lfs; no float()
        # of a 400-digit integer (OverflowError): it is bounded first
    expires_at = action.get("expires_at")
    if isinstance(expires_at, str) and expires_at:
        try:
            at = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
            if at.tzinfo is not None:
                ttl = min(ttl, at.timestamp() - time.time())
        except (ValueError, OverflowError, OSError):
            raise UpstreamBadResponse("LFS batch answer: expires_at is not an RFC 3339 time") from None
    return ttl
