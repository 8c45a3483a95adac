"""Logs: the logging layer redacts tokens, JWTs, keys and Authorization values, whoever logs them."""

from __future__ import annotations

import io
import logging

import pytest

from proxy.logs import RedactingFilter, Redactor

SECRETS_IN_LINES = [
    ("minted ghs_16C7e42F292c6912E7710c838347Ae178B4a for acme", "ghs_16C7e42F"),
    ("stateless ghs_123_eyJhbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJl done", "eyJhbGciOi"),
    ("pat ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdef"),
    ("fine-grained github_pat_11ABCDEFG0123456789_abcdefXYZ", "github_pat_11ABC"),
    ("{'Authorization': 'Basic eC1hY2Nlc3MtdG9rZW46c2VjcmV0', 'Accept': '*/*'}", "eC1hY2Nlc3Mt"),
    ("Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiIxIn0.c2ln", "eyJhbGciOiJSUzI1NiJ9"),
    ("jwt eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiIxIn0.c2lnbmF0dXJl", "eyJhbGciOiJSUzI1NiJ9"),
    ("key -----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "MIIEow"),
    ("clone https://x-access-token:abc123secret@github.com/acme/x", "abc123secret"),
]


@pytest.mark.parametrize(("line", "secret"), SECRETS_IN_LINES)
def test_patterns_are_redacted(line: str, secret: str) -> None:
    redacted = Redactor().redact(line)
    assert secret not in redacted
    assert "redacted" in redacted


def test_known_static_tokens_are_redacted_exactly() -> None:
    redactor = Redactor()
    redactor.add_secrets(["plain-looking-token-value"])
    assert redactor.redact("token=plain-looking-token-value!") == "token=<redacted>!"


def test_filter_covers_args_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(Redactor()))
    logger = logging.getLogger("test_logs_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("headers %s", {"Authorization": "Basic c2VjcmV0LXZhbHVl"})
        try:
            raise RuntimeError("failed with ghs_SECRETSECRETSECRET")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "c2VjcmV0LXZhbHVl" not in output
    assert "SECRETSECRETSECRET" not in output
    assert "RuntimeError" in output  # the traceback itself survives, only the secret goes
