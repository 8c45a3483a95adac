"""Key text as people paste it: telling an inline PEM from a file path, and undoing what YAML and env vars do to it.

Apart from `credentials/keys`, which parses keys, because the config needs the same answer ("is this privateKey a
file?") to resolve a relative path against the config file's folder, and the config must not import credentials.
"""

from __future__ import annotations

import base64
from pathlib import Path


def normalise_pem(text: str) -> bytes:
    """Undo what config files, env vars and copy-paste do to a PEM: quotes, literal \\n, CRLF, indentation."""
    text = text.strip().strip("'\"").replace("\\r", "").replace("\\n", "\n").replace("\r\n", "\n")
    return ("\n".join(line.strip() for line in text.strip().splitlines()) + "\n").encode()


def base64_pem(value: str) -> str | None:
    """The PEM inside a base64 value (as Kubernetes Secrets hold it), or None."""
    try:
        decoded = base64.b64decode("".join(value.split()), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded if "-----BEGIN" in decoded else None


def is_inline_key(value: str) -> bool:
    return "-----BEGIN" in value or base64_pem(value) is not None


def key_file_of(value: str) -> Path | None:
    """The file a privateKey value names, or None when the value is the key itself (PEM or base64 PEM)."""
    if not value.strip() or is_inline_key(value):
        return None
    return Path(value.strip()).expanduser()
