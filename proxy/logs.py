"""Logs: redaction lives in the logging layer itself, so even a careless `log.info(headers)` leaks no secret."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

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
    parse. The redacted fields also go on the record as `audit`, so the formatters can lay them out as the other
    lines are (JSON with `level` and `logger`, or text). A message that is not JSON is redacted as text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            document = json.loads(record.getMessage())
        except (ValueError, TypeError):
            return super().filter(record)
        redacted = self._redact_values(document)
        record.msg = json.dumps(redacted, separators=(",", ":"))
        record.args = None
        if isinstance(redacted, dict):
            record.audit = redacted
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


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message`; a line outside any request has no `[...]` (never `[None]`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        request_id = self._request_id_of(record)
        tag = f" [{request_id}]" if request_id else ""
        return f"{record.asctime} {record.levelname} {record.name}{tag}: {self._text_of(record)}"

    def _request_id_of(self, record: logging.LogRecord) -> object:
        return getattr(record, "request_id", None)

    def _text_of(self, record: logging.LogRecord) -> str:
        return record.message


class AuditTextFormatter(TextFormatter):
    """An audit line for a terminal: `GET github.com acme/app upload-pack 200 bytes_in=... duration_ms=...`."""

    _LEAD = ("method", "host", "repo", "service", "status")
    _SKIPPED = frozenset({"ts", "request_id", *_LEAD})  # the time and the id are already in the line's prefix

    def _request_id_of(self, record: logging.LogRecord) -> object:
        audit = getattr(record, "audit", None)
        return audit.get("request_id") if isinstance(audit, dict) else None

    def _text_of(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        if not isinstance(audit, dict):
            return record.message
        lead = [str(audit[key]) for key in self._LEAD if audit.get(key) is not None]
        rest = [f"{key}={_text_value(value)}" for key, value in audit.items() if key not in self._SKIPPED]
        return " ".join(lead + [item for item in rest if not item.endswith("=None")])


def _text_value(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


_JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(request_id)s"
_JSON_RENAMES = {"levelname": "level", "name": "logger"}


class AuditJsonFormatter(JsonFormatter):
    """An audit line as JSON: the `level` and `logger` fields every line has, then the audit fields themselves
    (not a JSON document quoted inside `message`)."""

    def __init__(self) -> None:
        super().__init__(_JSON_FIELDS, rename_fields=_JSON_RENAMES, timestamp="ts")

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        audit = log_data.pop("audit", None)
        if isinstance(audit, dict):
            log_data.pop("message", None)
            log_data.update(audit)


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(_JSON_FIELDS, rename_fields=_JSON_RENAMES, timestamp="ts")  # ts: ISO 8601, UTC
    return TextFormatter()


def _audit_formatter(log_format: str) -> logging.Formatter:
    return AuditJsonFormatter() if log_format == "json" else AuditTextFormatter()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")


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
    # Audit lines go to a handler of their own, for log shippers: laid out like every other line, in the same
    # format, and redacted all the same.
    audit = logging.StreamHandler(sys.stderr)
    audit.setFormatter(_audit_formatter(log_format))
    audit.addFilter(AuditRedactingFilter(redactor))
    audit_logger = logging.getLogger("git_token_proxy.audit")
    audit_logger.handlers[:] = [audit]
    audit_logger.propagate = False
    return redactor
