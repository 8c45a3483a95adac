"""Logs: the logging layer redacts tokens, JWTs, keys and Authorization values, whoever logs them."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import logs
from proxy.logs import AuditRedactingFilter, RedactingFilter, Redactor, sanitise_for_client

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


AUDIT_PIECES = [*"\"'\\{}[],: =\n\tabcAZ09_-", "Authorization", "Bearer ", "token ", "ghs_", "eyJ", "://u:p@",
                "-----BEGIN RSA PRIVATE KEY-----", "a" * 16, "Basic "]  # fmt: skip
AUDIT_VALUES = st.lists(st.sampled_from(AUDIT_PIECES), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(AUDIT_VALUES, min_size=1, max_size=5))
def test_every_audit_line_parses_as_json_whatever_its_values(values: list[str]) -> None:
    """The redactor must never cut through JSON syntax: values are redacted before the line is serialised."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(AuditRedactingFilter(Redactor()))
    record = {f"k{i}": value for i, value in enumerate(values)} | {"path": "/" + "/".join(values)}
    logger = logging.getLogger("test.audit.json")
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.info("%s", json.dumps(record, separators=(",", ":")))
    line = stream.getvalue()
    assert json.loads(line).keys() == record.keys()


def test_audit_values_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(AuditRedactingFilter(Redactor()))
    logger = logging.getLogger("test.audit.redacted")
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.info("%s", json.dumps({"path": '/x/Authorization: "Basic c2VjcmV0LXNlY3JldC1zZWNyZXQ=', "n": 1}))
    line = json.loads(stream.getvalue())
    assert "c2VjcmV0" not in line["path"] and line["n"] == 1


def test_messages_for_git_are_one_bounded_redacted_line() -> None:
    hostile = "\x1b[31mred\x1b[0m\nremote: forged line ghs_abcdefghijklmnop eyJa.eyJb.c2ln " + "x" * 5000
    shown = sanitise_for_client(hostile)
    assert "\x1b" not in shown and "\n" not in shown
    assert "ghs_abcdefghijklmnop" not in shown and "eyJa.eyJb" not in shown
    assert len(shown) <= 1000


def audit_line(log_format: str, record: dict[str, object]) -> str:
    """One audit record through the handler `configure_logging` installs, as the proxy writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs._audit_formatter(log_format))
    handler.addFilter(AuditRedactingFilter(Redactor()))
    logger = logging.getLogger(f"git_token_proxy.audit.test.{log_format}")
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.info("%s", json.dumps(record))
    return stream.getvalue().strip()


AUDIT = {"ts": "2025-01-01T00:00:00.000+00:00", "request_id": "ab12", "client": None, "method": "GET",
         "host": "github.com", "repo": "acme/app", "service": "upload-pack", "status": 200, "bytes_in": 0,
         "bytes_out": 42, "entry": "acme-app", "token": "cached", "reason": "a reason with spaces"}  # fmt: skip


def test_json_audit_lines_are_built_by_the_formatter_with_level_and_logger() -> None:
    line = json.loads(audit_line("json", AUDIT))
    assert line["level"] == "INFO" and line["logger"] == "git_token_proxy.audit.test.json"
    assert {key: line[key] for key in AUDIT} == AUDIT  # the audit fields themselves, at the top level
    assert "message" not in line


def test_text_audit_lines_are_text() -> None:
    line = audit_line("text", AUDIT)
    assert line.endswith(
        "INFO git_token_proxy.audit.test.text [ab12]: GET github.com acme/app upload-pack 200 bytes_in=0 bytes_out=42 "
        'entry=acme-app token=cached reason="a reason with spaces"'
    )
    assert "client=" not in line and "{" not in line  # nothing null, nothing JSON


def test_text_lines_outside_a_request_have_no_request_id() -> None:
    record = logging.LogRecord("git_token_proxy", logging.INFO, __file__, 1, "started", None, None)
    record.request_id = None
    line = logs.TextFormatter().format(record)
    assert line.endswith("INFO git_token_proxy: started") and "None" not in line
    record.request_id = "ci-job-42"
    assert logs.TextFormatter().format(record).endswith("INFO git_token_proxy [ci-job-42]: started")
