"""JWKS: strict parsing of key sets, and keys fetched from a real issuer over HTTP (URL and discovery): cached,
refetched at most once a minute per issuer, kept when the JWKS breaks or goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from proxy.access.identities import IdentityVerifier, build_verifier
from proxy.access.jwks import JwksRefused, KeyRegistry, keys_from_file, parse_key_set
from proxy.config import ConfigError
from proxy.config.files import NamedFileProblem, read_jwks_file
from proxy.config.issuers import IssuerConfig, url_problem
from proxy.errors import TokenRefused
from proxy.testing.issuer import JwksMode, TestIssuer, generate_key, sign

ALGORITHMS = ("ES256", "RS256")


class Clock:
    """The registry's monotonic clock, moved by hand: "a minute later" without waiting a minute."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    async with TestIssuer() as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def registry(clock: Clock) -> AsyncIterator[KeyRegistry]:
    async with aiohttp.ClientSession() as session:
        keys = KeyRegistry(session, clock=clock, fetch_timeout=2)
        yield keys
        await keys.close()


def config(issuer: TestIssuer, **overrides: Any) -> IssuerConfig:
    data = {"name": "orchestrator", "issuer": issuer.url, "audience": "git-token-proxy", "jwksUrl": issuer.jwks_url}
    return IssuerConfig.model_validate({**data, "repos": [".*"], **overrides})


async def refused(verifier: IdentityVerifier, token: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        await verifier.verify(token)
    return str(caught.value)


# ---------------------------------------------------------------- parsing


def jwks(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def test_a_good_set_and_its_lookups() -> None:
    es, rs = generate_key("ES256"), generate_key("RS256")
    keys = parse_key_set(jwks(es.public_jwk(), rs.public_jwk()), ALGORITHMS)
    assert [key.kid for key in keys.keys] == [es.kid, rs.kid] and keys.skipped == ()
    assert keys.find(es.kid) is keys.keys[0] and keys.find("other") is None
    assert keys.find(None) is None  # two keys: a token without kid is ambiguous
    assert set(keys.keys[0].by_algorithm) == {"ES256"} and keys.keys[0].description == "EC P-256"
    assert keys.keys[1].description == "RSA-2048"


def test_a_key_without_alg_serves_what_its_type_allows_within_the_issuers_list() -> None:
    rs = generate_key("RS256")
    jwk = {name: value for name, value in rs.public_jwk().items() if name not in ("alg", "kid")}
    keys = parse_key_set(jwks(jwk), ("ES256", "RS256", "PS256"))
    assert set(keys.keys[0].by_algorithm) == {"RS256", "PS256"}
    assert keys.find(None) is keys.keys[0] and keys.find("any-kid") is keys.keys[0]  # the only key


def test_unusable_keys_are_skipped_and_counted() -> None:
    es = generate_key("ES256")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    good = es.public_jwk()
    unusable: list[Any] = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**good, "kid": "private", "d": "AAAA"},
        {**good, "kid": "enc", "use": "enc"},
        {**good, "kid": "ops", "key_ops": ["encrypt"]},
        {**good, "kid": "wrong-alg", "alg": "RS256"},
        {**good, "kid": "curve", "crv": "P-384"},
        {**good, "kid": "off-curve", "y": good["x"]},
        {**RSAAlgorithm.to_jwk(small, as_dict=True), "kid": "small"},
        {**good, "kid": 7},
        {**good, "kid": "x" * 300},
        {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "k1"},
        {"kty": "RSA", "n": ["x"], "e": {"a": 1}, "kid": "weird"},
        "not an object",
        {**good},  # the same kid again
    ]
    keys = parse_key_set(jwks(good, *unusable), ALGORITHMS)
    assert [key.kid for key in keys.keys] == [es.kid]
    assert len(keys.skipped) == len(unusable)
    text = "\n".join(keys.skipped)
    expected = ["not a public signing key type", "private key material", "use is not 'sig'", "lack 'verify'",
                "does not fit", "malformed", "1024 bits", "kid is not a string", "repeats an earlier"]  # fmt: skip
    assert all(reason in text for reason in expected), text


def test_an_es256_only_issuer_skips_rsa_keys() -> None:
    es, rs = generate_key("ES256"), generate_key("RS256")
    keys = parse_key_set(jwks(es.public_jwk(), rs.public_jwk()), ("ES256",))
    assert [key.kid for key in keys.keys] == [es.kid]
    assert "the issuer accepts only ES256" in keys.skipped[0]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not valid JSON"),
        (b"<html>", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"keys": {}}', "no 'keys' list"),
        (b'{"keys": []}', "no usable key"),
        (b'{"keys": [{"kty": "oct", "k": "AA"}]}', "no usable key"),
        (b"[" * 100_000, "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        (json.dumps({"keys": [{}] * 101}).encode(), "over the 100 read"),
        (b'{"keys": []}' + b" " * (1024 * 1024), "over 1024 KiB"),
    ],
)
def test_malformed_sets_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(JwksRefused, match=reason):
        parse_key_set(data, ALGORITHMS)


def test_a_jwks_file(tmp_path: Path) -> None:
    es = generate_key("ES256")
    path = tmp_path / "issuer.jwks.json"
    path.write_bytes(jwks(es.public_jwk()))
    assert keys_from_file(path, ALGORITHMS).find(es.kid) is not None
    with pytest.raises(JwksRefused, match="cannot read"):
        keys_from_file(tmp_path / "missing.json", ALGORITHMS)
    with pytest.raises(JwksRefused, match="not a regular file"):
        keys_from_file(tmp_path, ALGORITHMS)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(JwksRefused, match="a FIFO"):
        keys_from_file(fifo, ALGORITHMS)
    path.write_text("{")
    with pytest.raises(JwksRefused, match=f"jwksFile {path}: JWKS is not valid JSON"):
        keys_from_file(path, ALGORITHMS)


def test_the_loader_reads_the_jwks_file_once(tmp_path: Path) -> None:
    es = generate_key("ES256")
    path = tmp_path / "issuer.jwks.json"
    path.write_bytes(jwks(es.public_jwk()))
    data = {"name": "k8s", "issuer": "https://kubernetes.default.svc", "audience": "git-token-proxy",
            "jwksFile": "issuer.jwks.json", "repos": [".*"]}  # fmt: skip
    config = read_jwks_file(0, IssuerConfig.model_validate(data, context={"config_folder": tmp_path}))
    assert config.jwks_file == path and config.jwks == path.read_bytes()
    path.unlink()  # building the verifier reads nothing more
    verifier = build_verifier([config], (), KeyRegistry())
    token = sign({"alg": "ES256", "kid": es.kid}, {"iss": "https://kubernetes.default.svc", "aud": "git-token-proxy",
                 "sub": "system:serviceaccount:ci:runner", "exp": time.time() + 60}, es)  # fmt: skip
    assert asyncio.run(verifier.verify(token)).client == "system:serviceaccount:ci:runner"
    with pytest.raises(NamedFileProblem, match=f"cannot read {path}"):
        read_jwks_file(0, config)
    path.write_text('{"keys": [{"kty": "oct", "k": "AA"}]}')
    with pytest.raises(ConfigError, match="no usable key"):  # the keys are parsed when the verifier is built
        build_verifier([read_jwks_file(0, config)], (), KeyRegistry())


def test_a_bad_jwks_file_is_a_config_error_naming_the_issuer(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": []}')
    data = {"name": "k8s", "issuer": "https://kubernetes.default.svc", "audience": "git-token-proxy",
            "jwksFile": str(path), "repos": [".*"]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"access.issuers 'k8s': jwksFile .* no usable key"):
        build_verifier([IssuerConfig.model_validate(data)], (), KeyRegistry())
    remote = {**data, "jwksFile": None, "jwksUrl": "https://keys.example/jwks"}
    with pytest.raises(ConfigError, match="no HTTP session"):
        build_verifier([IssuerConfig.model_validate(remote)], (), KeyRegistry())


@pytest.mark.parametrize(
    ("url", "fetchable"),
    [
        ("https://keys.example/jwks", True),
        ("https://keys.example:8443/jwks?tenant=a", True),
        ("http://127.0.0.1:9000/jwks", True),
        ("http://127.8.0.1/jwks", True),
        ("http://[::1]:9000/jwks", True),
        ("http://localhost/jwks", True),
        ("http://keys.example/jwks", False),
        ("http://10.0.0.1/jwks", False),
        ("https://user:pw@keys.example/jwks", False),
        ("https://keys.example/jwks#x", False),
        ("file:///etc/keys.json", False),
        ("https://[::1/jwks", False),
        ("keys.example/jwks", False),
    ],
)
def test_which_urls_keys_are_fetched_from(url: str, fetchable: bool) -> None:
    assert (url_problem(url) is None) is fetchable


# ---------------------------------------------------------------- fetching


async def test_the_first_fetch_starts_in_the_background(issuer: TestIssuer, registry: KeyRegistry) -> None:
    build_verifier([config(issuer)], (), registry)  # no token asks for keys
    async with asyncio.timeout(10):
        await issuer.jwks_fetched(1)


async def test_rotation_by_url_is_picked_up_within_the_refetch_interval(
    issuer: TestIssuer, registry: KeyRegistry, clock: Clock
) -> None:
    verifier = build_verifier([config(issuer)], (), registry)
    await verifier.verify(issuer.mint())
    assert issuer.jwks_fetches == 1
    new = issuer.rotate("ES256")
    token = issuer.mint(kid=new.kid)
    clock.now += 10  # within a minute of the last fetch: the unknown kid does not fetch again
    assert "unknown signing key" in await refused(verifier, token)
    assert issuer.jwks_fetches == 1
    clock.now += 51
    assert (await verifier.verify(token)).subject == "sandbox-1"
    assert issuer.jwks_fetches == 2


async def test_the_background_refresh_picks_up_rotation_before_any_token_asks(issuer: TestIssuer, clock: Clock) -> None:
    async with aiohttp.ClientSession() as session:
        registry = KeyRegistry(session, clock=clock, refresh_interval=0.01)
        verifier = build_verifier([config(issuer)], (), registry)
        await verifier.verify(issuer.mint())
        new = issuer.rotate("ES256")
        fetched = issuer.jwks_fetches
        async with asyncio.timeout(10):
            await issuer.jwks_fetched(fetched + 2)  # one refresh is surely past the rotation
        token = issuer.mint(kid=new.kid)
        before = issuer.jwks_fetches
        assert (await verifier.verify(token)).subject == "sandbox-1"  # the clock never moved: no refetch needed
        assert issuer.jwks_fetches - before <= 1  # (at most a refresh that happened meanwhile)
        await registry.close()


async def test_a_burst_of_made_up_kids_costs_at_most_one_fetch(
    issuer: TestIssuer, registry: KeyRegistry, clock: Clock
) -> None:
    verifier = build_verifier([config(issuer)], (), registry)
    tokens = [issuer.mint(headers={"kid": f"made-up-{index}"}) for index in range(50)]
    results = await asyncio.gather(*(verifier.verify(token) for token in tokens), return_exceptions=True)
    assert all(isinstance(result, TokenRefused) for result in results)
    assert issuer.jwks_fetches == 1  # the first fetch, shared by all 50
    clock.now += 61
    results = await asyncio.gather(*(verifier.verify(token) for token in tokens), return_exceptions=True)
    assert all(isinstance(result, TokenRefused) for result in results)
    assert issuer.jwks_fetches == 2  # one refetch, shared again


async def test_a_jwks_that_goes_away_leaves_cached_keys_working(
    issuer: TestIssuer, registry: KeyRegistry, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = build_verifier([config(issuer)], (), registry)
    await verifier.verify(issuer.mint())
    for breaks in (issuer.remove_jwks, issuer.serve_garbage):
        breaks()
        clock.now += 61
        assert "unknown signing key" in await refused(verifier, issuer.mint(headers={"kid": "new"}))  # refetch fails
        assert (await verifier.verify(issuer.mint(alg="RS256"))).subject == "sandbox-1"
    assert issuer.jwks_fetches == 3
    assert "answered HTTP 404; keeping the 2 keys fetched before" in caplog.text
    assert "JWKS is not valid JSON; keeping the 2 keys fetched before" in caplog.text


@pytest.mark.parametrize("mode", [JwksMode.HUGE, JwksMode.GARBAGE])
async def test_a_huge_or_malformed_jwks_is_refused_and_the_previous_keys_stay(
    issuer: TestIssuer, registry: KeyRegistry, clock: Clock, caplog: pytest.LogCaptureFixture, mode: JwksMode
) -> None:
    verifier = build_verifier([config(issuer)], (), registry)
    await verifier.verify(issuer.mint())
    issuer.mode = mode
    issuer.rotate("ES256")
    clock.now += 61
    await refused(verifier, issuer.mint(headers={"kid": "unknown"}))
    assert issuer.jwks_fetches == 2
    assert (await verifier.verify(issuer.mint(alg="RS256"))).subject == "sandbox-1"
    assert ("over 1024 KiB" if mode is JwksMode.HUGE else "not valid JSON") in caplog.text


async def test_a_jwks_that_lists_no_usable_key_withdraws_every_key(
    issuer: TestIssuer, registry: KeyRegistry, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = build_verifier([config(issuer)], (), registry)
    await verifier.verify(issuer.mint())
    for key in list(issuer.keys):  # the issuer retires every key: its JWKS answers {"keys": []}
        issuer.retire(key.kid)
    clock.now += 61
    await refused(verifier, issuer.mint(headers={"kid": "unknown"}))  # a refetch
    reason = await refused(verifier, issuer.mint())  # signed by a key the issuer no longer lists
    assert reason.startswith("issuer 'orchestrator' has no usable signing key (its JWKS lists no usable key")
    assert "2 keys withdrawn" in caplog.text
    issuer.rotate("ES256", "k-new")  # and a key listed again is used again
    clock.now += 61
    assert (await verifier.verify(issuer.mint(kid="k-new"))).subject == "sandbox-1"


async def test_a_jwks_with_only_keys_of_other_algorithms_withdraws_them_too(
    issuer: TestIssuer, registry: KeyRegistry, clock: Clock
) -> None:
    verifier = build_verifier([config(issuer, algorithms=["ES256"])], (), registry)
    await verifier.verify(issuer.mint())
    for key in list(issuer.keys):
        if key.algorithm == "ES256":
            issuer.retire(key.kid)
    clock.now += 61
    await refused(verifier, issuer.mint(headers={"kid": "unknown"}))
    assert "lists no usable key" in await refused(verifier, issuer.mint())


async def test_a_reload_dropping_a_source_mid_fetch_refuses_its_waiters_instead_of_cancelling_them(
    issuer: TestIssuer, registry: KeyRegistry
) -> None:
    issuer.mode = JwksMode.HANGING
    verifier = build_verifier([config(issuer)], (), registry)
    waiting = asyncio.create_task(verifier.verify(issuer.mint()))
    async with asyncio.timeout(10):
        await issuer.jwks_fetched(1)
    await registry.retain(())  # the new config no longer names this issuer: its fetch is cancelled
    with pytest.raises(TokenRefused, match="has no usable signing key"):
        await waiting
    assert not waiting.cancelled()


async def test_a_jwks_that_never_answered_refuses_tokens_with_a_reason(
    issuer: TestIssuer, registry: KeyRegistry
) -> None:
    issuer.mode = JwksMode.FAILING
    verifier = build_verifier([config(issuer)], (), registry)
    reason = await refused(verifier, issuer.mint())
    assert reason.startswith("issuer 'orchestrator' has no usable signing key (its JWKS could not be fetched: JWKS at")
    assert "answered HTTP 503" in reason


async def test_an_unreachable_jwks(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = build_verifier([config(issuer, jwksUrl="http://127.0.0.1:9/jwks")], (), registry)
    assert "could not be fetched (ClientConnectorError)" in await refused(verifier, issuer.mint())


async def test_a_jwks_that_hangs_is_given_up(issuer: TestIssuer, clock: Clock) -> None:
    issuer.mode = JwksMode.HANGING
    async with aiohttp.ClientSession() as session:
        registry = KeyRegistry(session, clock=clock, fetch_timeout=0.2)
        verifier = build_verifier([config(issuer)], (), registry)
        assert "did not answer within 0.2 s" in await refused(verifier, issuer.mint())
        await registry.close()


async def test_a_waiting_request_cancelled_does_not_cancel_the_fetch(issuer: TestIssuer, registry: KeyRegistry) -> None:
    issuer.mode = JwksMode.HANGING
    verifier = build_verifier([config(issuer)], (), registry)
    waiting = asyncio.create_task(verifier.verify(issuer.mint()))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    issuer.mode = JwksMode.SERVING
    issuer.release_hanging()  # the fetch in flight gets its answer: a JWKS
    assert (await verifier.verify(issuer.mint())).subject == "sandbox-1"
    assert issuer.jwks_fetches == 1


async def test_discovery(issuer: TestIssuer, registry: KeyRegistry) -> None:
    verifier = build_verifier([config(issuer, jwksUrl=None)], (), registry)
    assert (await verifier.verify(issuer.mint())).subject == "sandbox-1"
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (1, 1)


async def test_discovery_for_another_issuer_is_refused(issuer: TestIssuer, registry: KeyRegistry) -> None:
    issuer.discovery_issuer = "https://someone-else.example"
    verifier = build_verifier([config(issuer, jwksUrl=None)], (), registry)
    assert "is for another issuer" in await refused(verifier, issuer.mint())
    assert issuer.jwks_fetches == 0


@pytest.mark.parametrize("jwks_uri", ["http://keys.example/jwks", "file:///etc/passwd", 42])
async def test_discoverys_jwks_uri_must_be_https(issuer: TestIssuer, registry: KeyRegistry, jwks_uri: Any) -> None:
    issuer.discovery_jwks_uri = jwks_uri
    verifier = build_verifier([config(issuer, jwksUrl=None)], (), registry)
    reason = await refused(verifier, issuer.mint())
    assert "jwks_uri" in reason
    assert issuer.jwks_fetches == 0


async def test_a_reload_keeps_fetched_keys_and_drops_unused_sources(issuer: TestIssuer, registry: KeyRegistry) -> None:
    first = build_verifier([config(issuer)], (), registry)
    await first.verify(issuer.mint())
    second = build_verifier([config(issuer)], ("revoked",), registry)  # the same issuer: the same keys
    await second.verify(issuer.mint())
    assert issuer.jwks_fetches == 1
    await registry.retain(second.key_sets)
    third = build_verifier([config(issuer, algorithms=["ES256"])], (), registry)  # another source
    await registry.retain(third.key_sets)
    await third.verify(issuer.mint())
    assert issuer.jwks_fetches == 2


async def test_fetch_failures_are_logged_without_query_strings(
    issuer: TestIssuer, registry: KeyRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    issuer.mode = JwksMode.GONE
    verifier = build_verifier([config(issuer, jwksUrl=f"{issuer.jwks_url}?secret=s3cr3t")], (), registry)
    await refused(verifier, issuer.mint())
    assert "answered HTTP 404" in caplog.text and "s3cr3t" not in caplog.text
