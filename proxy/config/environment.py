"""Environment: where `serve`, `check` and `healthcheck` get their config: a file, or one GitHub App described by
GIT_TOKEN_PROXY_* variables (or the matching flags), as git-sync's GITSYNC_* and Argo CD's githubApp* fields do.

Without a file, the config is one upstream (the GitHub URL's host) and one catch-all app entry for it, validated by
the same models as a file, with messages that name the variable instead of a key.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..credentials.keys import load_app_key
from ..pem import key_file_of
from .auth import GITHUB_APP_INSTALLATION, GitHubAppEntry
from .base import ConfigError
from .load import load_config, parse_config
from .root import Config, with_server_settings

PREFIX = "GIT_TOKEN_PROXY_"
ENTRY_ID = "github-app"  # the one entry's id, as logs, metrics and messages name it
ENTRY_LOCATION = "github.appInstallation.auth[0]"


@dataclass(frozen=True)
class Variable:
    """One setting: `GIT_TOKEN_PROXY_<name>` in the environment, `--<name>` on the command line (which wins)."""

    name: str
    help: str
    location: str = ""  # the config key it becomes, for messages
    metavar: str = "VALUE"  # what it takes, in --help

    @property
    def env(self) -> str:
        return PREFIX + self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name.lower()

    @property
    def label(self) -> str:
        return f"{self.env} ({self.flag})"


CLIENT_ID = Variable(
    "CLIENT_ID", "the GitHub App's Client ID (Iv23li...)", f"{ENTRY_LOCATION}.clientId", metavar="CLIENT_ID"
)
APP_ID = Variable(
    "APP_ID", "the app's numeric id, instead of a Client ID (GHES before 3.14)", f"{ENTRY_LOCATION}.appId", "NUMBER"
)
PRIVATE_KEY = Variable(
    "PRIVATE_KEY",
    "the app's private key: a path to the .pem, or the PEM itself",
    f"{ENTRY_LOCATION}.privateKey",
    "PATH|PEM",
)
# git-sync's spelling (GITSYNC_GITHUB_APP_PRIVATE_KEY_FILE): a path only.
PRIVATE_KEY_FILE = Variable(
    "PRIVATE_KEY_FILE",
    "the app's private key as a path only (git-sync's habit)",
    f"{ENTRY_LOCATION}.privateKey",
    "PATH",
)
INSTALLATION_ID = Variable(
    "INSTALLATION_ID", "skip the installation look-up (optional)", f"{ENTRY_LOCATION}.installationId", "NUMBER"
)
GITHUB_URL = Variable(
    "GITHUB_URL", "https://github.com (the default), or a GitHub Enterprise Server", "upstreams[0]", "URL"
)
UPSTREAM_URL = Variable(
    "UPSTREAM_URL",
    "where GITHUB_URL's host really is (a mirror; the fake of `python -m proxy.testing`): paths keep its host",
    "upstreams[0].url",
    "URL",
)
API_URL = Variable(
    "API_URL",
    "the REST API (default: https://api.github.com, or <GITHUB_URL>/api/v3)",
    f"{ENTRY_LOCATION}.apiUrl",
    "URL",
)
READ_ONLY = Variable(
    "READ_ONLY", "true: refuse pushes and mint contents:read tokens", f"{ENTRY_LOCATION}.readOnly", "true|false"
)
APP_VARIABLES = (
    CLIENT_ID, APP_ID, PRIVATE_KEY, PRIVATE_KEY_FILE, INSTALLATION_ID, GITHUB_URL, UPSTREAM_URL, API_URL, READ_ONLY
)  # fmt: skip

HOST = Variable("HOST", "listen on this address (default 127.0.0.1; overrides server.host)", "server.host", "ADDRESS")
PORT = Variable("PORT", "listen on this port (default 8080; overrides server.port)", "server.port", "PORT")
METRICS_PORT = Variable(
    "METRICS_PORT", "/metrics, /healthz and /readyz on a port of their own", "server.metricsPort", "PORT"
)
METRICS_HOST = Variable(
    "METRICS_HOST", "the address of that port (default: the listen address)", "server.metricsHost", "ADDRESS"
)
CONFIG = Variable("CONFIG", "a YAML config file: several apps, static tokens, access control", metavar="PATH")
LISTEN_VARIABLES = (HOST, PORT, METRICS_PORT, METRICS_HOST)
# Read by the CLI itself (flags of their own); listed so that they count as known.
LOG_LEVEL = Variable("LOG_LEVEL", "DEBUG, INFO (serve's default), WARNING, ERROR", metavar="LEVEL")
LOG_FORMAT = Variable("LOG_FORMAT", "json lines (the default), or text for terminals", metavar="json|text")
KNOWN_VARIABLES = (CONFIG, *LISTEN_VARIABLES, *APP_VARIABLES, LOG_LEVEL, LOG_FORMAT)
DEFAULT_GITHUB_URL = "https://github.com"


def add_arguments(parser: argparse.ArgumentParser, *variables: Variable) -> None:
    """The flags of these variables; each help names its variable. Values are checked later, in one place."""
    for variable in variables:
        parser.add_argument(variable.flag, metavar=variable.metavar, help=f"{variable.help} [{variable.env}]")


def unknown_variables(environ: Mapping[str, str], config_text: str = "") -> list[str]:
    """One warning per GIT_TOKEN_PROXY_* variable that is no setting, naming the closest one. A variable the
    config file references (`${GIT_TOKEN_PROXY_CI_TOKEN}`) is the user's own, not a typo."""
    known = {variable.env for variable in KNOWN_VARIABLES}
    warnings = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in known or "${" + name in config_text:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; the settings are {PREFIX}CONFIG, {PREFIX}PORT, ..."
        warnings.append(f"{name} is not a setting of git-token-proxy and is ignored{hint}")
    return warnings


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and where it came from. `rendered` is the environment's config as YAML data whose
    secret values are `${VAR}` references: a reload expands them again, and so never needs them written down."""

    config: Config
    path: Path | None  # the config file, if there is one
    source: str  # the file's path, or "environment"
    host: str
    port: int
    rendered: dict[str, Any] | None = None
    key_variable: Variable | None = None  # the environment's key: PRIVATE_KEY or PRIVATE_KEY_FILE
    # With a file: server settings given as flags or variables, which win over the file's (and its reloads')
    server_overrides: dict[str, object] = field(default_factory=dict)


def client_address(host: str, port: int) -> str:
    """How a client on this machine reaches a listener: a wildcard address is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 (compared, not bound)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def settings_of(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[Variable, str]:
    """Every variable that is set (a flag before the environment), stripped; empty values count as unset."""
    found: dict[Variable, str] = {}
    for variable in (CONFIG, *LISTEN_VARIABLES, *APP_VARIABLES):
        value = getattr(args, variable.dest, None)
        if value is None:
            value = environ.get(variable.env)
        if value is not None and value.strip():
            found[variable] = value.strip()
    return found


def load(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> LoadedConfig:
    """The config `serve` would run: from the file (`--config` or GIT_TOKEN_PROXY_CONFIG), or from the app
    variables; never both, since one would silently lose."""
    settings = settings_of(args, environ)
    app_settings = [variable for variable in APP_VARIABLES if variable in settings]
    file = settings.get(CONFIG)
    if file and app_settings:
        raise ConfigError(
            f"{CONFIG.flag} (or {CONFIG.env}) cannot be combined with {', '.join(v.env for v in app_settings)}: "
            "the file holds the auth entries. Describe the app in the file, or drop the file to run one app from "
            f"the environment. ({HOST.env} and {PORT.env} work with both.)"
        )
    if file:
        overrides = _server_overrides(settings)
        config = with_server_settings(load_config(file), overrides)
        host, port = _listen_address(settings, config)
        _refuse_one_port_twice(settings, config, port)
        return LoadedConfig(config, Path(file), file, host, port, server_overrides=overrides)
    if not app_settings:
        raise ConfigError(
            f"no configuration: give {CONFIG.flag} FILE (or {CONFIG.env}), or describe one GitHub App with "
            f"{CLIENT_ID.env} (or {APP_ID.env}) and {PRIVATE_KEY.env}"
        )
    rendered = render_app_config(settings, environ)
    key_variable = PRIVATE_KEY_FILE if PRIVATE_KEY_FILE in settings else PRIVATE_KEY
    config = _parse_rendered(rendered, key_variable)
    host, port = _listen_address(settings, config)
    _refuse_one_port_twice(settings, config, port)
    return LoadedConfig(config, None, "environment", host, port, rendered, key_variable)


def _server_overrides(settings: Mapping[Variable, str]) -> dict[str, object]:
    """--metrics-port and --metrics-host over a file's server section, as --host and --port are."""
    overrides: dict[str, object] = {}
    if METRICS_PORT in settings:
        overrides["metrics_port"] = parse_port(settings[METRICS_PORT], METRICS_PORT.label)
    if METRICS_HOST in settings:
        overrides["metrics_host"] = settings[METRICS_HOST]
    return overrides


def _listen_address(settings: Mapping[Variable, str], config: Config) -> tuple[str, int]:
    host = settings.get(HOST, config.server.host)
    port = parse_port(settings[PORT], PORT.label) if PORT in settings else config.server.port
    return host, port


def _refuse_one_port_twice(settings: Mapping[Variable, str], config: Config, port: int) -> None:
    """/metrics on the git port is what no metrics port means; the same number for both is a mistake."""
    metrics_port = config.server.metrics_port
    if metrics_port is None or port == 0 or metrics_port != port:
        return
    where = METRICS_PORT.label if METRICS_PORT in settings else "server.metricsPort"
    raise ConfigError(
        f"{where}: {metrics_port} is also the git port; give the probes and /metrics another port, or leave "
        "it unset to serve them on the git port"
    )


def parse_port(text: str, where: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ConfigError(f"{where}: {text!r} is not a port number (0-65535)")
    return int(text)


def _positive_id(text: str, variable: Variable) -> int:
    if not text.isdigit() or int(text) == 0:
        raise ConfigError(f"{variable.label}: {text!r} is not a positive integer id")
    return int(text)


def _flag(text: str, variable: Variable) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"{variable.label}: {text!r} is not true or false")


def _upstream(settings: Mapping[Variable, str]) -> dict[str, str]:
    """The one upstream: GITHUB_URL's host, which clients name in their paths, served where UPSTREAM_URL says
    (by default at GITHUB_URL itself)."""
    url = _http_url(settings.get(GITHUB_URL, DEFAULT_GITHUB_URL), GITHUB_URL)
    upstream = {"host": urlsplit(url).netloc.lower(), "url": url}
    if UPSTREAM_URL in settings:
        if API_URL not in settings:
            # The API's default follows GITHUB_URL (api.github.com for github.com): the app's JWT would go there,
            # not to the server UPSTREAM_URL names.
            raise ConfigError(f"{UPSTREAM_URL.label} needs {API_URL.label} too: the REST API of that server")
        upstream["url"] = _http_url(settings[UPSTREAM_URL], UPSTREAM_URL)
    return upstream


def _http_url(text: str, variable: Variable) -> str:
    url = text.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
        raise ConfigError(f"{variable.label}: {url!r} is not an http(s)://host[:port] URL")
    return url


def _private_key(settings: Mapping[Variable, str], environ: Mapping[str, str]) -> str:
    """A file path becomes absolute (a reload must find it from anywhere); a key given in the environment stays
    a reference to its variable, so that the rendered config never holds it."""
    if PRIVATE_KEY in settings and PRIVATE_KEY_FILE in settings:
        raise ConfigError(f"{PRIVATE_KEY.label} and {PRIVATE_KEY_FILE.label} are both set: keep one")
    if PRIVATE_KEY_FILE in settings:
        path = settings[PRIVATE_KEY_FILE]
        if key_file_of(path) is None:
            raise ConfigError(f"{PRIVATE_KEY_FILE.label} takes a path to the app's .pem, not the key itself")
        return str(Path(path).absolute())
    value = settings.get(PRIVATE_KEY)
    if value is None:
        raise ConfigError(f"{PRIVATE_KEY.label} is required: the path to the app's .pem (or the PEM itself)")
    file = key_file_of(value)
    if file is not None:
        return str(file.absolute())
    from_environment = environ.get(PRIVATE_KEY.env, "").strip() == value
    return f"${{{PRIVATE_KEY.env}}}" if from_environment else value


def _app_entry(settings: Mapping[Variable, str], environ: Mapping[str, str], host: str) -> dict[str, Any]:
    if CLIENT_ID not in settings and APP_ID not in settings:
        raise ConfigError(
            f"{CLIENT_ID.label} or {APP_ID.label} is required: the app's Client ID, from its settings page"
        )
    entry: dict[str, Any] = {
        "id": ENTRY_ID,
        "type": GITHUB_APP_INSTALLATION,
        # Every repo on the host: the app's installations decide which ones it can read.
        "urlPattern": f"(?<baseUrl>{re.escape(host)})/.*",
        "privateKey": _private_key(settings, environ),
    }
    if CLIENT_ID in settings:
        entry["clientId"] = settings[CLIENT_ID]
    if APP_ID in settings:
        entry["appId"] = _positive_id(settings[APP_ID], APP_ID)
    if INSTALLATION_ID in settings:
        entry["installationId"] = _positive_id(settings[INSTALLATION_ID], INSTALLATION_ID)
    if API_URL in settings:
        entry["apiUrl"] = settings[API_URL]
    if READ_ONLY in settings:
        entry["readOnly"] = _flag(settings[READ_ONLY], READ_ONLY)
    return entry


def render_app_config(settings: Mapping[Variable, str], environ: Mapping[str, str]) -> dict[str, Any]:
    """The config file these settings stand for, as data."""
    upstream = _upstream(settings)
    server: dict[str, Any] = {}
    if HOST in settings:
        server["host"] = settings[HOST]
    if PORT in settings:
        server["port"] = parse_port(settings[PORT], PORT.label)
    if METRICS_PORT in settings:
        server["metricsPort"] = parse_port(settings[METRICS_PORT], METRICS_PORT.label)
    if METRICS_HOST in settings:
        server["metricsHost"] = settings[METRICS_HOST]
    return {
        "server": server,
        "upstreams": [upstream],
        "github": {"appInstallation": {"auth": [_app_entry(settings, environ, upstream["host"])]}},
    }


def _parse_rendered(rendered: dict[str, Any], key_variable: Variable) -> Config:
    try:
        return parse_config(rendered, "environment")
    except ConfigError as error:
        raise ConfigError(name_variables(str(error), key_variable)) from None


def name_variables(message: str, key_variable: Variable = PRIVATE_KEY) -> str:
    """A message about the rendered config, told in the variables the user set."""
    for variable in (*APP_VARIABLES, *LISTEN_VARIABLES):
        if variable.location and variable is not PRIVATE_KEY_FILE:
            label = key_variable.label if variable is PRIVATE_KEY else variable.label
            message = message.replace(f"{variable.location}.url", label)
            message = message.replace(variable.location, label)
    entry = f"auth entry {ENTRY_ID!r}: "
    message = message.replace(f"{entry}cannot read privateKey file", f"{key_variable.label}: cannot read")
    message = message.replace(f"{entry}privateKey", key_variable.label)
    return message.replace(ENTRY_LOCATION, "the app").replace("environment: invalid configuration", "environment")


def check_keys(loaded: LoadedConfig) -> None:
    """Parses every key now, before anything is logged or bound: a bad key is the likeliest start-up mistake,
    and its message should be the only line. The environment's key is named by its variable, not by the entry id
    the user never wrote. (The app parses them again when it is built; a key takes a millisecond.)"""
    for entry in loaded.config.auth:
        if isinstance(entry, GitHubAppEntry):
            try:
                load_app_key(entry.id, entry.private_key.get_secret_value())
            except ConfigError as error:
                if loaded.rendered is None:
                    raise
                raise ConfigError(
                    f"environment: {name_variables(str(error), loaded.key_variable or PRIVATE_KEY)}"
                ) from None


def reloadable_path(loaded: LoadedConfig) -> Path:
    """A path that `serve` can reload from, as it reloads a file on SIGHUP or `--watch`: the file itself, or
    the environment's config written out. Its secrets stay `${VAR}` references, and on Linux it is written to
    memory (memfd), not to a disk, so a read-only root filesystem is no obstacle."""
    if loaded.path is not None:
        return loaded.path
    text = yaml.safe_dump(loaded.rendered, sort_keys=False).encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("git-token-proxy-config")  # kept open for the life of the process
        os.write(fd, text)
        return Path(f"/proc/self/fd/{fd}")
    handle, name = tempfile.mkstemp(prefix="git-token-proxy-", suffix=".yaml")  # 0600
    with os.fdopen(handle, "wb") as file:
        file.write(text)
    atexit.register(os.unlink, name)
    return Path(name)
