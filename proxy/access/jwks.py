"""JWKS: an issuer's public keys, from a file, a URL or OIDC discovery; parsed strictly, cached, refetched within
limits, so that a token's look-up is a dictionary hit and a hostile or absent JWKS never costs the keys we have."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt

from ..config.base import ConfigError
from ..config.issuers import IssuerConfig, url_problem
from ..files import read_regular_file
from .identities import SigningKeys

log = logging.getLogger("git_token_proxy.jwks")

MAX_JWKS_BYTES = 1024 * 1024  # a JWKS is a few KiB; a discovery document too
MAX_KEYS = 100  # issuers publish 1-5 keys; parsing an RSA key costs tens of µs, so a set is bounded
MIN_RSA_BITS = 2048
FETCH_TIMEOUT = 5.0  # each of discovery and JWKS, whole (connect, headers and body)
REFETCH_INTERVAL = 60.0  # an unknown kid refetches at most this often per issuer: a burst of made-up kids is one fetch
# A background refresh: a key the issuer adds is seen before a token with its kid arrives, and a key it withdraws
# stops verifying within about this long (plus a remembered token's REVERIFY_AFTER). One small GET a minute.
REFRESH_INTERVAL = 60.0
_READ_CHUNK = 64 * 1024

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}  # each curve has exactly one
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
# Members only a private or symmetric key has: a JWKS that publishes one is broken (and PyJWK would load a private
# key object, which has no verify()).
_SECRET_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JwksRefused(Exception):
    """A JWKS (or discovery document) that cannot be used; the message is one line, without key material."""


class NoUsableKey(JwksRefused):
    """A well-formed JWKS that lists no key we may use: the issuer's word that none is valid now, not a fault."""


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    description: str  # "EC P-256", "RSA-2048", "Ed25519": for reasons
    by_algorithm: Mapping[str, jwt.PyJWK]  # built once: the algorithm is bound to the key, never taken from a token


@dataclass(frozen=True)
class KeySet:
    keys: tuple[VerificationKey, ...]
    skipped: tuple[str, ...] = ()  # why each unusable key was left out
    by_kid: Mapping[str, VerificationKey] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_kid", {key.kid: key for key in self.keys if key.kid is not None})

    def find(self, kid: str | None) -> VerificationKey | None:
        """By kid; a token without kid (or a set whose only key has none) works only with exactly one key."""
        found = self.by_kid.get(kid) if kid is not None else None
        if found is None and len(self.keys) == 1 and (kid is None or self.keys[0].kid is None):
            return self.keys[0]
        return found


def parse_key_set(data: bytes, algorithms: Collection[str]) -> KeySet:
    """A JWKS document, strictly: bounded, a `keys` list of at most MAX_KEYS, and at least one key usable with
    `algorithms`. Unusable keys are skipped and counted; a document with none is refused (JwksRefused)."""
    document = _json_object(data, "JWKS")
    listed = document.get("keys")
    if not isinstance(listed, list):
        raise JwksRefused("JWKS has no 'keys' list")
    if len(listed) > MAX_KEYS:
        raise JwksRefused(f"JWKS lists {len(listed)} keys, over the {MAX_KEYS} read")
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for index, jwk in enumerate(listed):
        key = _verification_key(jwk, algorithms)
        if isinstance(key, str):
            skipped.append(f"key {index}: {key}")
        elif key.kid is not None and any(key.kid == kept.kid for kept in keys):
            skipped.append(f"key {index}: kid {key.kid!r} repeats an earlier key's")
        else:
            keys.append(key)
    if not keys:
        reasons = "; ".join(skipped[:3]) or "the list is empty"
        raise NoUsableKey(f"JWKS has no usable key for {', '.join(algorithms)} ({reasons})")
    return KeySet(tuple(keys), tuple(skipped))


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JWKS_BYTES:
        raise JwksRefused(f"{what} is over {MAX_JWKS_BYTES // 1024} KiB")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: `[[[[...`
        raise JwksRefused(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise JwksRefused(f"{what} is not a JSON object")
    return document


def _verification_key(jwk: object, allowed: Collection[str]) -> VerificationKey | str:
    """The key, or why it is skipped."""
    if not isinstance(jwk, dict):
        return "not a JSON object"
    kid = jwk.get("kid")
    if kid is not None and not (isinstance(kid, str) and 0 < len(kid) <= 256):
        return "its kid is not a string of 1-256 characters"
    kty, crv = jwk.get("kty"), jwk.get("crv")
    fits = _algorithms_for(kty, crv)
    description = "RSA" if kty == "RSA" else f"{kty} {crv}" if kty == "EC" else str(crv)
    if not fits:
        return f"kty {str(kty)[:20]!r} (crv {str(crv)[:20]!r}) is not a public signing key type"
    if jwk.keys() & _SECRET_MEMBERS:
        return "it holds private key material: a JWKS must publish public keys only"
    if jwk.get("use", "sig") != "sig":
        return "its use is not 'sig'"
    operations = jwk.get("key_ops")
    if operations is not None and not (isinstance(operations, list) and "verify" in operations):
        return "its key_ops lack 'verify'"
    declared = jwk.get("alg")
    if declared is not None:
        if declared not in fits:
            return f"its alg {str(declared)[:20]!r} does not fit a {description} key"
        fits = frozenset({declared})
    usable = [algorithm for algorithm in allowed if algorithm in fits]
    if not usable:
        return f"a {description} key, and the issuer accepts only {', '.join(allowed)}"
    try:
        by_algorithm = {algorithm: jwt.PyJWK(jwk, algorithm=algorithm) for algorithm in usable}
    except Exception:  # hostile members (a list for `n`, a point off the curve): whatever PyJWT raises, skip the key
        return "its key members are malformed"
    if kty == "RSA":
        bits = by_algorithm[usable[0]].key.key_size
        if bits < MIN_RSA_BITS:
            return f"an RSA key of {bits} bits (at least {MIN_RSA_BITS})"
        description = f"RSA-{bits}"
    return VerificationKey(kid, description, by_algorithm)


def _algorithms_for(kty: object, crv: object) -> frozenset[str]:
    if kty == "RSA":
        return _RSA_ALGORITHMS
    if kty == "EC" and isinstance(crv, str) and crv in _EC_ALGORITHMS:
        return frozenset({_EC_ALGORITHMS[crv]})
    if kty == "OKP" and crv in _OKP_CURVES:
        return frozenset({"EdDSA"})
    return frozenset()  # "oct" (a shared secret) among others: never a verification key here


def keys_from_file(path: Path, algorithms: Collection[str]) -> KeySet:
    return _parse_file(path, _read_jwks_file(path), algorithms)


def _read_jwks_file(path: Path) -> bytes:
    try:
        return read_regular_file(path, MAX_JWKS_BYTES)
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
        raise JwksRefused(f"jwksFile {path}: cannot read: {reason}") from None


def _parse_file(path: Path, data: bytes, algorithms: Collection[str]) -> KeySet:
    try:
        return parse_key_set(data, algorithms)
    except JwksRefused as error:
        raise JwksRefused(f"jwksFile {path}: {error}") from None


# ---------------------------------------------------------------- key sources


class StaticKeys:
    """A jwksFile's keys: fixed until the next config load."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys

    def find(self, kid: str | None) -> VerificationKey | None:
        return self.keys.find(kid)

    async def refetch(self) -> None:
        return None

    @property
    def problem(self) -> str | None:
        return None


class RemoteKeys:
    """Keys from a JWKS URL, or from the one discovery names. Fetched in the background at start and every
    `refresh_interval`; on an unknown kid at most once per `refetch_interval` (single-flight: concurrent callers
    share the fetch in flight). A failed fetch keeps the keys there were; a JWKS that answers with no usable key
    withdraws them all, as an issuer retiring its last key means it."""

    def __init__(
        self, config: IssuerConfig, session: aiohttp.ClientSession, *,
        refetch_interval: float = REFETCH_INTERVAL, refresh_interval: float = REFRESH_INTERVAL,
        fetch_timeout: float = FETCH_TIMEOUT, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.name = config.name
        self._issuer = config.issuer
        self._jwks_url = config.jwks_url
        self._discovery_url = config.discovery_url
        self._algorithms = tuple(config.algorithms)
        self._session = session
        self._refetch_interval = refetch_interval
        self._refresh_interval = refresh_interval
        self._timeout = fetch_timeout
        self._clock = clock
        self._keys: KeySet | None = None
        self._problem = "its JWKS has not been fetched yet"
        self._last_attempt: float | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.fetches = 0  # attempts, for tests and metrics

    def start(self) -> None:
        """The first fetch, in the background: serving does not wait for it (tokens do, through `refetch`)."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name=f"jwks refresh {self.name}"
            )

    async def close(self) -> None:
        for task in (self._refresher, self._in_flight):
            if task is not None:
                task.cancel()
        for task in (self._refresher, self._in_flight):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = self._in_flight = None

    def find(self, kid: str | None) -> VerificationKey | None:
        return self._keys.find(kid) if self._keys is not None else None

    @property
    def problem(self) -> str | None:
        return None if self._keys is not None else self._problem

    async def refetch(self) -> None:
        if self._in_flight is None:
            recent = self._last_attempt is not None and self._clock() - self._last_attempt < self._refetch_interval
            if recent:
                return
            self._start_fetch()
        assert self._in_flight is not None
        # asyncio.wait, not shield: a client that disconnects while waiting must not cancel the fetch the others
        # share, and a fetch cancelled under them (a reload closing this source) is not their cancellation: they go
        # on and are refused for want of a key.
        await asyncio.wait([self._in_flight])

    def _start_fetch(self) -> None:
        self._last_attempt = self._clock()
        task = asyncio.get_running_loop().create_task(self._fetch(), name=f"jwks fetch {self.name}")
        task.add_done_callback(self._fetch_done)
        self._in_flight = task

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._in_flight is task:
            self._in_flight = None

    async def _refresh_forever(self) -> None:
        while True:
            if self._in_flight is None:
                self._start_fetch()
            assert self._in_flight is not None
            await asyncio.wait([self._in_flight])
            await asyncio.sleep(self._refresh_interval)

    async def _fetch(self) -> None:
        """Never raises (but for cancellation): whatever the issuer answers, the keys we have stay usable."""
        self.fetches += 1
        try:
            url = self._jwks_url or await self._discover()
            keys = parse_key_set(await self._get(url, "JWKS"), self._algorithms)
        except NoUsableKey as error:
            self._withdraw_all(error)
            return
        except JwksRefused as error:
            self._problem = f"its JWKS could not be fetched: {error}"
            kept = f"keeping the {len(self._keys.keys)} keys fetched before" if self._keys else "no keys yet"
            log.warning("issuer %r: %s; %s", self.name, error, kept)
            return
        except Exception:  # a bug here must not end the refresh loop or surface in a request
            log.error("issuer %r: JWKS fetch failed unexpectedly", self.name, exc_info=True)
            return
        self._log_change(keys, url)
        self._keys = keys

    def _withdraw_all(self, error: NoUsableKey) -> None:
        had = len(self._keys.keys) if self._keys else 0
        self._keys = None
        self._problem = f"its JWKS lists no usable key: {error}"
        log.warning(
            "issuer %r: %s; %d keys withdrawn, its tokens are refused until it lists one", self.name, error, had
        )

    def _log_change(self, keys: KeySet, url: str) -> None:
        before = {key.kid for key in self._keys.keys} if self._keys else None
        after = {key.kid for key in keys.keys}
        level = logging.DEBUG if before == after else logging.INFO
        skipped = f"; {len(keys.skipped)} skipped ({'; '.join(keys.skipped[:3])})" if keys.skipped else ""
        kids = ", ".join(sorted(repr(kid) for kid in after))
        log.log(
            level, "issuer %r: %d signing keys from %s: %s%s", self.name, len(keys.keys), _shown(url), kids, skipped
        )

    async def _discover(self) -> str:
        assert self._discovery_url is not None
        document = _json_object(await self._get(self._discovery_url, "discovery document"), "discovery document")
        # OpenID Connect Discovery 1.0, 4.3: the document must name the issuer it was asked for.
        if document.get("issuer") != self._issuer:
            raise JwksRefused(f"the discovery document at {_shown(self._discovery_url)} is for another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise JwksRefused(f"the discovery document at {_shown(self._discovery_url)} has no jwks_uri")
        problem = url_problem(jwks_uri)
        if problem is not None:
            raise JwksRefused(f"discovery's jwks_uri: {problem}")
        return jwks_uri

    async def _get(self, url: str, what: str) -> bytes:
        """The body of a 200 answer, at most MAX_JWKS_BYTES (as decompressed), within the fetch timeout. No redirect
        is followed: one could lead from https to plain http."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.get(
                    url, allow_redirects=False, headers={"Accept": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as response:  # fmt: skip
                    if response.status != 200:
                        raise JwksRefused(f"{what} at {_shown(url)} answered HTTP {response.status}")
                    return await _read_bounded(response, f"{what} at {_shown(url)}")
        except TimeoutError:
            raise JwksRefused(f"{what} at {_shown(url)} did not answer within {self._timeout:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as error:
            raise JwksRefused(f"{what} at {_shown(url)} could not be fetched ({type(error).__name__})") from None


async def _read_bounded(response: aiohttp.ClientResponse, what: str) -> bytes:
    declared = response.content_length
    if declared is not None and declared > MAX_JWKS_BYTES:
        raise JwksRefused(f"{what} is over {MAX_JWKS_BYTES // 1024} KiB")
    body = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > MAX_JWKS_BYTES:
            response.close()  # not drained: a gzip bomb or an endless body stops here
            raise JwksRefused(f"{what} is over {MAX_JWKS_BYTES // 1024} KiB")
    return bytes(body)


def _shown(url: str) -> str:
    """A URL for logs and reasons without its query (which could carry a secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# ---------------------------------------------------------------- the registry


class KeyRegistry:
    """Every issuer's keys, for the life of the process: a reload that keeps an issuer keeps its fetched keys (no
    refetch burst on SIGHUP), and a jwksFile is read again on every load. Without a session (`check`, offline),
    only jwksFile issuers can be had."""

    def __init__(
        self, session: aiohttp.ClientSession | None = None, *, refetch_interval: float = REFETCH_INTERVAL,
        refresh_interval: float = REFRESH_INTERVAL, fetch_timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._session = session
        self._options: dict[str, Any] = {
            "refetch_interval": refetch_interval, "refresh_interval": refresh_interval,
            "fetch_timeout": fetch_timeout, "clock": clock,
        }  # fmt: skip
        self._remote: dict[tuple[str, str, str | None, tuple[str, ...]], RemoteKeys] = {}

    def keys_for(self, config: IssuerConfig) -> SigningKeys:
        """Inside the running loop (a new remote source starts its background fetch). ConfigError: a jwksFile
        that cannot be used."""
        if config.jwks_file is not None:
            try:
                if config.jwks is None:  # not through the loader (a test, a tool): read it now
                    return StaticKeys(keys_from_file(config.jwks_file, config.algorithms))
                return StaticKeys(_parse_file(config.jwks_file, config.jwks, config.algorithms))
            except JwksRefused as error:
                raise ConfigError(f"access.issuers {config.name!r}: {error}") from None
        source = (config.name, config.issuer, config.jwks_url, tuple(config.algorithms))
        keys = self._remote.get(source)
        if keys is None:
            if self._session is None:
                raise ConfigError(
                    f"access.issuers {config.name!r}: its keys are fetched over HTTP, and no HTTP "
                    "session was given here"
                )
            keys = self._remote[source] = RemoteKeys(config, self._session, **self._options)
            keys.start()
        return keys

    async def retain(self, in_use: Iterable[SigningKeys]) -> None:
        """After a reload: stop the sources the new config no longer names."""
        keep = {id(keys) for keys in in_use}
        for source, keys in list(self._remote.items()):
            if id(keys) not in keep:
                del self._remote[source]
                await keys.close()

    async def close(self) -> None:
        await self.retain(())
