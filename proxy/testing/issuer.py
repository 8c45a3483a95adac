"""A test OIDC issuer: keys made with cryptography, discovery and JWKS served by aiohttp on loopback, tokens minted
on demand (good ones, and the forged, confused and oversized ones an attacker would try)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, Self

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..access.grants import SigningKey, public_jwk, thumbprint

DEFAULT_AUDIENCE = "git-token-proxy"


class JwksMode(Enum):
    SERVING = "serving"
    GONE = "gone"  # 404
    GARBAGE = "garbage"  # 200, not JSON
    HUGE = "huge"  # 200, a JWKS-shaped document of 2 MiB
    FAILING = "failing"  # 503
    HANGING = "hanging"  # no answer until release_hanging() or close()


@dataclass(frozen=True)
class IssuerKey:
    kid: str
    algorithm: str
    private: SigningKey

    def public_jwk(self) -> dict[str, str]:
        return {**public_jwk(self.private.public_key()), "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def generate_key(algorithm: str = "ES256", kid: str | None = None) -> IssuerKey:
    """A fresh key for `algorithm` (ES256/384/512, RS256 (2048 bits), EdDSA); the kid defaults to its thumbprint."""
    private: SigningKey
    if algorithm.startswith("ES"):
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[algorithm]
        private = ec.generate_private_key(curve)
    elif algorithm.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"no key type for {algorithm}")
    return IssuerKey(kid or thumbprint(public_jwk(private.public_key())), algorithm, private)


class TestIssuer:
    """`async with TestIssuer() as issuer:` serves `{issuer.url}/.well-known/openid-configuration` and
    `{issuer.url}/jwks`. It starts with an ES256 and an RS256 key; `rotate()` adds one, `retire(kid)` removes one
    from the JWKS (its tokens still mint), `mode` breaks the JWKS on purpose. `jwks_fetches` counts JWKS requests."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, algorithms: Sequence[str] = ("ES256", "RS256")) -> None:
        self.keys = [generate_key(algorithm) for algorithm in algorithms]
        self.published = {key.kid for key in self.keys}
        self.mode = JwksMode.SERVING
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.url = ""
        self.discovery_issuer: str | None = None  # what discovery names as its issuer; None: self.url
        self.discovery_jwks_uri: str | None = None  # what discovery names as jwks_uri; None: self.jwks_url
        self._closing = asyncio.Event()
        self._fetched = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.url

    async def jwks_fetched(self, count: int) -> None:
        """Returns once the JWKS has been asked for `count` times (wrap it in a timeout)."""
        async with self._fetched:
            await self._fetched.wait_for(lambda: self.jwks_fetches >= count)

    def release_hanging(self) -> None:
        """Answers held by `JwksMode.HANGING` go on, as the mode now says."""
        self._closing.set()

    async def close(self) -> None:
        self.release_hanging()  # so that the server can stop
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    # ------------------------------------------------------------ keys

    def key(self, kid_or_algorithm: str | None = None) -> IssuerKey:
        """A key by kid, or the first one for an algorithm; None: the first key."""
        for key in self.keys:
            if kid_or_algorithm in (None, key.kid, key.algorithm):
                return key
        raise KeyError(kid_or_algorithm)

    def rotate(self, algorithm: str = "ES256", kid: str | None = None, *, publish: bool = True) -> IssuerKey:
        key = generate_key(algorithm, kid)
        self.keys.append(key)
        if publish:
            self.published.add(key.kid)
        return key

    def retire(self, kid: str) -> None:
        self.published.discard(kid)

    def remove_jwks(self) -> None:
        """The JWKS answers 404 from now on (`mode = JwksMode.SERVING` brings it back)."""
        self.mode = JwksMode.GONE

    def serve_garbage(self) -> None:
        self.mode = JwksMode.GARBAGE

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.public_jwk() for key in self.keys if key.kid in self.published]}

    def jwks_bytes(self) -> bytes:
        """The JWKS as a jwksFile holds it."""
        return json.dumps(self.jwks()).encode()

    # ------------------------------------------------------------ tokens

    def claims(
        self, sub: str = "sandbox-1", *, aud: str | list[str] = DEFAULT_AUDIENCE, ttl: float = 600,
        iss: str | None = None, extra_claims: Mapping[str, Any] | None = None, omit: Sequence[str] = (),
    ) -> dict[str, Any]:  # fmt: skip
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": iss if iss is not None else self.url, "aud": aud, "sub": sub,
            "iat": now, "exp": now + int(ttl), "jti": secrets.token_hex(8),
        }  # fmt: skip
        claims.update(extra_claims or {})
        for name in omit:
            claims.pop(name, None)
        return claims

    def mint(
        self, sub: str = "sandbox-1", *, aud: str | list[str] = DEFAULT_AUDIENCE, ttl: float = 600,
        iss: str | None = None, kid: str | None = None, alg: str | None = None,
        extra_claims: Mapping[str, Any] | None = None, headers: Mapping[str, Any] | None = None,
        omit: Sequence[str] = (),
    ) -> str:  # fmt: skip
        """A token signed by the key `kid` names (or the first key for `alg`, or the first key). `extra_claims`
        override the standard ones (`{"exp": ...}`, `{"iat": ...}`); `headers` override `kid` and `typ`, and a
        header given as None is left out (`{"kid": None}`: a token without kid)."""
        key = self.key(kid if kid is not None else alg)
        header = {"alg": key.algorithm, "kid": key.kid, "typ": "JWT", **(headers or {})}
        claims = self.claims(sub, aud=aud, ttl=ttl, iss=iss, extra_claims=extra_claims, omit=omit)
        return sign(header, claims, key)

    def forge_hs256(self, secret: bytes, claims: Mapping[str, Any], kid: str | None = None) -> str:
        """The algorithm-confusion attack: HS256, keyed with (for instance) a public key's PEM bytes. Built by
        hand, since PyJWT refuses to use a public key as an HMAC secret."""
        header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
        signing_input = f"{_segment(header)}.{_segment(claims)}"
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(signature)}"

    def forge_unsigned(self, claims: Mapping[str, Any], kid: str | None = None) -> str:
        """`alg: none`, no signature."""
        header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
        return f"{_segment(header)}.{_segment(claims)}."

    # ------------------------------------------------------------ serving

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        issuer = self.discovery_issuer if self.discovery_issuer is not None else self.url
        jwks_uri = self.discovery_jwks_uri if self.discovery_jwks_uri is not None else self.jwks_url
        return web.json_response({"issuer": issuer, "jwks_uri": jwks_uri})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        async with self._fetched:
            self._fetched.notify_all()
        if self.mode is JwksMode.GONE:
            return web.Response(status=404, text="Not Found")
        if self.mode is JwksMode.HANGING:
            await self._closing.wait()
        if self.mode is JwksMode.FAILING:
            return web.Response(status=503, text="Service Unavailable")
        if self.mode is JwksMode.GARBAGE:
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        if self.mode is JwksMode.HUGE:
            padding = "x" * (2 * 1024 * 1024)
            return web.Response(text=json.dumps({**self.jwks(), "padding": padding}), content_type="application/json")
        return web.json_response(self.jwks())


def sign(header: Mapping[str, Any], claims: Mapping[str, Any], key: IssuerKey) -> str:
    """A JWS over exactly this header (PyJWT's encode would refuse the odd ones tests need, such as a numeric
    kid), signed by PyJWT's algorithm for the key."""
    header = {name: value for name, value in header.items() if value is not None}
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    algorithm = jwt.get_algorithm_by_name(key.algorithm)
    return f"{signing_input}.{_b64(algorithm.sign(signing_input.encode(), key.private))}"


def _segment(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
