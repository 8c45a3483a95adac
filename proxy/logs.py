"""Logs: redaction lives in the logging layer itself, so even a careless `log.info(headers)` leaks no secret."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

# Set by `forward` for each request; asyncio copies it into tasks the request starts (a mint, for instance).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # GitHub tokens: ghs_ (installation, including the long stateless form with dots), ghp_, gho_, ghu_, ghr_.
    (re.compile(r"\b(gh[pousr]_)[A-Za-z0-9_.\-]+"), r"\1<redacted>"),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]+"), "github_pat_<redacted>"),
    # 16 characters at least: credentials are long, and prose like "token refresh failed" stays readable.
    (re.compile(r"(?i)\b(basic|bearer|token)(\s+)[A-Za-z0-9+/=._\-]{16,}"), r"\1\2<redacted>"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*['\"]?)[^'\"\s,}]+"), r"\1<redacted>"),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"), "<jwt redacted>"),
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
        "<private key redacted>",
    ),
    (re.compile(r"(://)[^/\s@]+@"), r"\1<redacted>@"),  # userinfo in URLs
)


def redact_shapes(text: str) -> str:
    """Everything shaped like a secret (tokens, JWTs, keys, Authorization values, URL credentials)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
CLIENT_MESSAGE_LIMIT = 1000


def sanitise_for_client(text: str, limit: int = CLIENT_MESSAGE_LIMIT) -> str:
    """What git prints to a terminal as `remote: ...`: one line, no escape sequences (ANSI, newlines that forge
    output), bounded, and redacted like a log line, since it may quote an upstream's words."""
    text = redact_shapes(_CONTROL.sub(" ", text[: limit * 4]))
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Redactor:
    """Known secrets (static tokens from the config) are replaced exactly; shapes of secrets by pattern."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self._secrets.update(secret for secret in secrets if len(secret) >= 4)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return redact_shapes(text)


class RedactingFilter(logging.Filter):
    """Rewrites the fully formatted message and any traceback text before a handler sees them."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call must not raise at its call site; show what there is
            message = f"{record.msg} {record.args!r}"
        record.msg = self.redactor.redact(message)
        record.args = None
        if record.exc_info:
            record.exc_text = self.redactor.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class AuditRedactingFilter(RedactingFilter):
    """Audit lines are JSON documents: their values are redacted one by one and the document serialised again,
    so that a redaction can never cut through JSON syntax (a quote, a brace) and leave a line that fails to
    parse. A message that is not JSON is redacted as text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            document = json.loads(record.getMessage())
        except (ValueError, TypeError):
            return super().filter(record)
        record.msg = json.dumps(self._redact_values(document), separators=(",", ":"))
        record.args = None
        return True

    def _redact_values(self, value: object) -> object:
        if isinstance(value, str):
            return self.redactor.redact(value)
        if isinstance(value, dict):
            return {key: self._redact_values(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._redact_values(item) for item in value]
        return value


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "%(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="ts",  # ISO 8601, UTC
        )
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")


def configure_logging(level: str = "INFO", secrets: Iterable[str] = (), log_format: str = "text") -> Redactor:
    """Logs go to stderr, every line redacted. Returns the redactor so later-known secrets can be added."""
    redactor = Redactor()
    redactor.add_secrets(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiocache").setLevel(logging.WARNING)  # it logs every cache get at DEBUG
    # Audit lines are JSON documents on their own lines, for log shippers; redacted all the same.
    audit = logging.StreamHandler(sys.stderr)
    audit.setFormatter(logging.Formatter("%(message)s"))
    audit.addFilter(AuditRedactingFilter(redactor))
    audit_logger = logging.getLogger("git_token_proxy.audit")
    audit_logger.handlers[:] = [audit]
    audit_logger.propagate = False
    return redactor
