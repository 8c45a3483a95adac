"""The object store that mirror snapshots live in: a thin asyncio S3 client (aiobotocore) with bounded reads, streamed
files and conditional writes, and the one place where the library's exceptions become ours.

aiobotocore is imported when the first store is opened, never at import time: only `mirror.snapshots` needs it, and
botocore costs a proxy about 25 MiB of RSS and half a second of start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("git_token_proxy.snapshots")

CONNECT_TIMEOUT = 5.0
# A read that waits this long for its next byte fails (aiohttp's sock_read): a stalled store never holds a fill.
READ_TIMEOUT = 30.0
# botocore's "standard" retries (throttling, 5xx, broken connections, with backoff): one more try, no more, so that a
# store that is away costs a fill about a second before it goes upstream.
ATTEMPTS = 2
CHUNK = 1 << 20
# botocore's debug log prints each request's headers, which carry a session token with IRSA or pod identity, and its
# info log names where credentials were found: whatever the proxy's level, these say nothing below WARNING.
_TALKATIVE_LOGGERS = ("botocore", "aiobotocore")


class ObjectStoreError(Exception):
    """The store failed or refused. `kind` is what a log line or a metric may name; the message never holds a
    credential (botocore's never do) and names at most a key, which is a digest."""

    kind = "failed"


class ObjectMissing(ObjectStoreError):
    kind = "missing"


class BucketMissing(ObjectStoreError):
    kind = "no_bucket"


class ObjectTooLarge(ObjectStoreError):
    kind = "too_large"


class ObjectTruncated(ObjectStoreError):
    kind = "truncated"


class PreconditionFailed(ObjectStoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""

    kind = "precondition"


class AccessDenied(ObjectStoreError):
    kind = "denied"


class StoreUnreachable(ObjectStoreError):
    kind = "unreachable"


class StoreTimeout(ObjectStoreError):
    kind = "timeout"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: float  # seconds since the epoch, by the store's clock


@dataclass(frozen=True)
class StaticCredentials:
    """Keys given in code, for tests and tools. The proxy never passes any: it uses the standard AWS chain
    (environment, shared files, web identity / IRSA, pod identity, instance metadata), never its config file."""

    access_key: str
    secret_key: str

    def __repr__(self) -> str:
        return "StaticCredentials(...)"


class ObjectStore:
    """One bucket. Nothing is imported or connected until the first call; `close` releases the connection pool."""

    def __init__(
        self, bucket: str, *, endpoint: str | None = None, region: str | None = None, ca_file: Path | None = None,
        credentials: StaticCredentials | None = None,
    ) -> None:  # fmt: skip
        self.bucket = bucket
        self._endpoint = endpoint
        self._region = region
        self._ca_file = ca_file
        self._credentials = credentials
        self._client: S3Client | None = None
        self._exit = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()

    async def _s3(self) -> S3Client:
        if self._client is None:
            async with self._opening:
                if self._client is None:
                    with _translated():
                        # Importing botocore and reading S3's service description (megabytes of JSON) takes about
                        # half a second: done in a thread, the event loop keeps serving meanwhile.
                        session, config = await asyncio.to_thread(self._prepare)
                        verify: str | bool = str(self._ca_file) if self._ca_file is not None else True
                        client = session.create_client("s3", endpoint_url=self._endpoint, config=config, verify=verify)
                        self._client = await self._exit.enter_async_context(client)
        assert self._client is not None
        return self._client

    def _prepare(self) -> tuple[Any, Any]:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        from .s3_http import NoRedirectSession

        for name in _TALKATIVE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        session = AioSession()
        if self._credentials is not None:
            session.set_credentials(self._credentials.access_key, self._credentials.secret_key)
        loader = session.get_component("data_loader")  # caches what it loads, for create_client to find
        for name in ("service-2", "endpoint-rule-set-1"):
            loader.load_service_model("s3", name)
        loader.load_data("partitions")
        config = AioConfig(
            region_name=self._region,
            signature_version="s3v4",
            # An S3-compatible server (MinIO, SeaweedFS, Ceph) rarely has a DNS name per bucket; AWS picks itself.
            s3={"addressing_style": "path" if self._endpoint else "auto",
                # The payload is not hashed for the signature: over plain http botocore would otherwise read the whole
                # file on the event loop to sign it. Snapshots carry their own sha256, checked on every restore.
                "payload_signing_enabled": False},
            # No CRC trailers on uploads (aws-chunked), which many S3-compatible servers do not speak; same reason.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "max_attempts": ATTEMPTS},
            user_agent_extra="git-token-proxy",
            http_session_cls=NoRedirectSession,  # a redirect would take the session token to another host
        )  # fmt: skip
        return session, config

    async def open(self) -> None:
        """Import botocore and build the client now (off the event loop) rather than on the first call."""
        await self._s3()

    async def close(self) -> None:
        await self._exit.aclose()
        self._client = None

    # ------------------------------------------------------------ reads

    async def read_small(self, key: str, limit: int) -> tuple[bytes, ObjectInfo]:
        """The whole object, if it holds at most `limit` bytes; ObjectTooLarge otherwise, unread."""
        data = bytearray()
        async with self.stream(key, limit) as (info, chunks):
            async for chunk in chunks:
                data += chunk
        return bytes(data), info

    @contextlib.asynccontextmanager
    async def stream(self, key: str, limit: int) -> AsyncIterator[tuple[ObjectInfo, AsyncIterator[bytes]]]:
        """The object's description and its bytes as they arrive. Refused unread when the store says it is larger
        than `limit`, and cut off if more than that arrives anyway (a store may lie about a length)."""
        s3 = await self._s3()
        with _translated():
            answer = await s3.get_object(Bucket=self.bucket, Key=key)
        body = answer["Body"]
        try:
            info = ObjectInfo(key, answer.get("ContentLength", -1), answer.get("ETag", ""),
                              _epoch(answer.get("LastModified")))  # fmt: skip
            if not 0 <= info.size <= limit:
                raise ObjectTooLarge(f"{key}: {info.size} bytes, more than the {limit} allowed")
            chunks = _bounded_chunks(body, info.size)
            try:
                yield info, chunks
            finally:
                await chunks.aclose()
        finally:
            body.close()

    async def head(self, key: str) -> ObjectInfo:
        s3 = await self._s3()
        with _translated():
            answer = await s3.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(key, answer.get("ContentLength", -1), answer.get("ETag", ""),
                          _epoch(answer.get("LastModified")))  # fmt: skip

    async def download(self, key: str, path: Path, limit: int) -> ObjectInfo:
        """Streamed into `path` (written off the event loop), at most `limit` bytes."""
        async with self.stream(key, limit) as (info, chunks):
            file = await asyncio.to_thread(path.open, "wb")
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(file.write, chunk)
            finally:
                await asyncio.to_thread(file.close)
        return info

    async def list(self, prefix: str, limit: int = 1000) -> list[ObjectInfo]:
        """The first `limit` (at most 1000: one page) objects under `prefix`; keys outside it are left out."""
        s3 = await self._s3()
        with _translated():
            answer = await s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=min(limit, 1000))
        found = []
        for item in answer.get("Contents", []):
            key = item.get("Key", "")
            if key.startswith(prefix):  # a store's answer is not trusted to stay in the prefix asked for
                found.append(ObjectInfo(key, item.get("Size", 0), item.get("ETag", ""),
                                        _epoch(item.get("LastModified"))))  # fmt: skip
        return found

    # ------------------------------------------------------------ writes

    async def upload(self, key: str, path: Path, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """`path` streamed to `key` in one PUT (up to 5 GiB); returns the new ETag. `if_none_match`: only if no
        object is there; `if_match`: only if the object there still has this ETag. PreconditionFailed otherwise."""
        size = (await asyncio.to_thread(path.stat)).st_size
        file = await asyncio.to_thread(path.open, "rb")
        try:
            return await self._put(key, file, size, if_none_match, if_match)
        finally:
            await asyncio.to_thread(file.close)

    async def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        return await self._put(key, data, len(data), if_none_match, if_match)

    async def _put(
        self, key: str, body: IO[bytes] | bytes, size: int, if_none_match: bool, if_match: str | None
    ) -> str:
        s3 = await self._s3()
        with _translated():
            if if_none_match:
                answer = await s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                                             IfNoneMatch="*")  # fmt: skip
            elif if_match is not None:
                answer = await s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                                             IfMatch=if_match)  # fmt: skip
            else:
                answer = await s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size)
        return answer.get("ETag", "")

    @contextlib.asynccontextmanager
    async def lock(self, key: str, lifetime: float) -> AsyncIterator[bool]:
        """A lock object taken with a conditional write (If-None-Match: *; AWS S3 has them since 2024, and so do
        MinIO and SeaweedFS): yields whether it is ours. One older than `lifetime` (by the store's clock, as the
        object's Last-Modified) belonged to a holder that died, and is taken over If-Match its ETag, so that of
        several replicas that find it stale only one gets it. Given back at the end only if still ours."""
        owner = secrets.token_hex(16).encode()
        try:
            etag: str | None = await self.put_bytes(key, owner, if_none_match=True)
        except PreconditionFailed:
            etag = await self._take_over(key, owner, lifetime)
        if etag is None:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(ObjectStoreError):  # left behind, it is taken over after `lifetime`
                await self.delete(key, if_match=etag)

    async def _take_over(self, key: str, owner: bytes, lifetime: float) -> str | None:
        try:
            held = await self.head(key)
            if time.time() - held.last_modified <= lifetime:
                return None
            return await self.put_bytes(key, owner, if_match=held.etag)
        except (PreconditionFailed, ObjectMissing):  # taken by another, or given back meanwhile: next time
            return None

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Deleting what is not there is not an error (S3 says 204 either way)."""
        s3 = await self._s3()
        with _translated():
            if if_match is not None:
                await s3.delete_object(Bucket=self.bucket, Key=key, IfMatch=if_match)
            else:
                await s3.delete_object(Bucket=self.bucket, Key=key)


async def _bounded_chunks(body: Any, size: int) -> AsyncGenerator[bytes, None]:
    received = 0
    with _translated():
        async for chunk in body.iter_chunks(CHUNK):
            received += len(chunk)
            if received > size:
                raise ObjectTooLarge(f"more than the {size} bytes announced arrived")
            yield chunk
    if received != size:
        raise ObjectTruncated(f"{received} of {size} bytes arrived")


def _epoch(value: Any) -> float:
    timestamp = getattr(value, "timestamp", None)
    return float(timestamp()) if callable(timestamp) else 0.0


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """The one place where botocore's and aiohttp's exceptions become ObjectStoreError (cancellation passes)."""
    try:
        yield
    except ObjectStoreError:
        raise
    except Exception as error:
        raise translate(error) from error


def translate(error: Exception) -> ObjectStoreError:
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        ConnectTimeoutError,
        CredentialRetrievalError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        ResponseStreamingError,
        TokenRetrievalError,
    )

    from .s3_http import StoreRedirected

    if isinstance(error, ClientError):
        return _from_answer(error)
    inner = getattr(error, "kwargs", {}).get("error")  # what botocore's HTTPClientError wraps
    if isinstance(inner, StoreRedirected):
        return ObjectStoreError(str(inner))
    if isinstance(error, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError | TokenRetrievalError):
        return AccessDenied(f"no usable AWS credentials ({type(error).__name__})")
    if isinstance(error, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
        return StoreTimeout(type(error).__name__)
    if isinstance(error, IncompleteReadError | ResponseStreamingError) or _is_aiohttp_error(error, "payload"):
        return ObjectTruncated(type(error).__name__)
    if isinstance(error, ConnectionError | OSError) or _is_aiohttp_error(error, "any"):
        return StoreUnreachable(_first_line(error))
    return ObjectStoreError(f"{type(error).__name__}: {_first_line(error)}")


def _from_answer(error: Any) -> ObjectStoreError:
    answer = getattr(error, "response", {}) or {}
    code = str(answer.get("Error", {}).get("Code", ""))
    status = int(answer.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    said = f"{code or 'HTTP'} ({status})"
    if code in ("NoSuchKey", "NotFound") or (status == 404 and code in ("", "404")):
        return ObjectMissing(said)
    if code == "NoSuchBucket":
        return BucketMissing(said)
    # 409 ConditionalRequestConflict: AWS's answer to two conditional writes racing for one key.
    if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return PreconditionFailed(said)
    if status in (401, 403):
        return AccessDenied(said)
    return ObjectStoreError(said)


def _is_aiohttp_error(error: Exception, which: Literal["payload", "any"]) -> bool:
    import aiohttp

    return isinstance(error, aiohttp.ClientPayloadError if which == "payload" else aiohttp.ClientError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
