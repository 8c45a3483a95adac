"""Files a config names, read once by the loader after the config is valid, with bounds: the CA bundle (checked
for a certificate), Concord secret files (their entries appended to `auth`) and a Fernet key file. A file may be
replaced by anything (a FIFO, /dev/zero, a 50 GiB file) while the proxy runs, and --watch reads them every few
seconds: every read is bounded, and only regular files are read."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

from pydantic import ValidationError

from ..files import read_regular_file
from .access import AccessConfig
from .auth import GITHUB_APP_INSTALLATION, GitHubAppEntry
from .cache import check_fernet_keys
from .issuers import IssuerConfig
from .messages import describe
from .root import Config

CONFIG_MAX_BYTES = 1024 * 1024
SECRET_FILE_MAX_BYTES = 64 * 1024  # a Concord secret is a few fields and one PEM of 2-4 KiB; a key file less
CA_FILE_MAX_BYTES = 16 * 1024 * 1024  # a CA bundle; the system one is about 200 KiB
JWKS_FILE_MAX_BYTES = 1024 * 1024  # a JWKS is a few KiB


class NamedFileProblem(ValueError):
    """A file the config names cannot be used: `location` is the key that names it."""

    def __init__(self, location: str, message: str) -> None:
        super().__init__(message)
        self.location = location


def read_named_files(config: Config) -> Config:
    """The config with what its files hold: raises NamedFileProblem naming the key of the first one that fails."""
    if config.tls.ca_file is not None:
        check_ca_file(config.tls.ca_file)
    redis = config.cache.redis
    if redis is not None and redis.encryption_key_file is not None:
        keys = read_fernet_key_file(redis.encryption_key_file)
        config = config.model_copy(update={"cache": config.cache.model_copy(update={"redis": redis.with_keys(keys)})})
    if any(issuer.jwks_file is not None for issuer in config.access.issuers):
        config = config.model_copy(update={"access": _with_jwks_files(config.access)})
    settings = config.github.app_installation
    if settings.secret_files:
        entries = [read_secret_file(index, path) for index, path in enumerate(settings.secret_files)]
        try:
            settings = settings.with_entries(entries)
        except ValueError as error:
            raise NamedFileProblem("github.appInstallation", str(error)) from None
        config = config.model_copy(update={"github": config.github.model_copy(update={"app_installation": settings})})
    return config


def _with_jwks_files(access: AccessConfig) -> AccessConfig:
    """Each issuer's jwksFile read once, bounded (the keys in it are parsed, and a bad set refused naming the
    issuer, when the verifier is built: at start-up, or by a reload, which is then refused whole)."""
    return access.model_copy(update={"issuers": [read_jwks_file(index, i) for index, i in enumerate(access.issuers)]})


def read_jwks_file(index: int, issuer: IssuerConfig) -> IssuerConfig:
    if issuer.jwks_file is None:
        return issuer
    try:
        return issuer.with_jwks(read_regular_file(issuer.jwks_file, JWKS_FILE_MAX_BYTES))
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte in it
        problem = f"cannot read {issuer.jwks_file}: {read_problem(error)}"
        raise NamedFileProblem(f"access.issuers[{index}].jwksFile", problem) from None


def check_ca_file(path: Path) -> None:
    """OpenSSL reads it later, at start-up: a missing file or one without a certificate would surface as a
    traceback there, and a FIFO or /dev/zero would hang start-up. Checked now, the message names the key."""
    try:
        data = read_regular_file(path, CA_FILE_MAX_BYTES)
    except (OSError, ValueError) as error:
        raise NamedFileProblem("tls.caFile", f"cannot read {path}: {read_problem(error)}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode())
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise NamedFileProblem("tls.caFile", f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def read_fernet_key_file(path: Path) -> list[str]:
    """One key per line, the encrypting one first, each checked to be a Fernet key (never echoed)."""
    where = "cache.redis.encryptionKeyFile"
    try:
        text = read_regular_file(path, SECRET_FILE_MAX_BYTES).decode()
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path, or not UTF-8
        raise NamedFileProblem(where, f"cannot read {path}: {read_problem(error)}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        check_fernet_keys(keys)
    except ValueError as error:
        raise NamedFileProblem(where, f"{path}: {error}") from None
    return keys


def read_secret_file(index: int, path: Path) -> GitHubAppEntry:
    """A Concord user secret: JSON whose `githubAppInstallation` holds the entry, with the PEM inline."""
    location, where = "github.appInstallation", f"secretFiles[{index}] ({path})"
    try:
        raw = read_regular_file(path, SECRET_FILE_MAX_BYTES)
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte in it
        raise NamedFileProblem(location, f"{where}: cannot read: {read_problem(error)}") from None
    try:
        data = json.loads(raw.decode())
    except UnicodeDecodeError:
        raise NamedFileProblem(location, f"{where}: not valid UTF-8") from None
    except ValueError as error:
        raise NamedFileProblem(location, f"{where}: not valid JSON: {error}") from None
    except RecursionError:
        raise NamedFileProblem(location, f"{where}: not valid JSON: nested too deeply") from None
    fields = data.get("githubAppInstallation") if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        raise NamedFileProblem(location, f"{where}: expected a JSON object with a 'githubAppInstallation' object")
    fields = {"id": f"secret:{path.stem}", **fields, "type": GITHUB_APP_INSTALLATION}
    try:
        return GitHubAppEntry.model_validate(fields)
    except ValidationError as error:
        raise NamedFileProblem(location, f"{where}: {describe(error).replace(chr(10), '; ')}") from None


def read_problem(error: OSError | ValueError) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)
