"""CLI: `serve`, `check`, `healthcheck` and `demo`. Every mistake a user can make ends here as one line naming the
thing and the fix, with exit status 2; never as a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import errno
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .config import Config, ConfigError, GitHubAppEntry, is_loopback
from .config import environment as sources
from .logs import LOG_FORMATS, LOG_LEVELS, configure_logging

log = logging.getLogger("git_token_proxy")

EXIT_CONFIG_ERROR = 2


class StartupError(Exception):
    """Something the configuration asks for cannot be had (a port in use): the message says what and how to fix."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as error:
        print(f"git-token-proxy: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StartupError as error:
        print(f"git-token-proxy: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as error:
        # Whatever else the config names but cannot be had: one line, not a traceback.
        print(f"git-token-proxy: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block: the mistake, a guess at what was meant, and where the
        usage is."""
        self.exit(EXIT_CONFIG_ERROR, f"{self.prog}: {message}{_did_you_mean(message)} (see {self.prog} --help)\n")


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def _did_you_mean(message: str) -> str:
    """`serv` → `serve`: argparse names the choices; difflib finds the closest."""
    found = _INVALID_CHOICE.search(message)
    if found is None:
        return ""
    choices = re.findall(r"'([^']*)'", found.group(2))
    close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _command(
    commands: argparse._SubParsersAction[_Parser], name: str, summary: str, examples: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


_SERVE_EXAMPLES = """\
  git-token-proxy serve --config /etc/git-token-proxy/config.yaml --watch
  GIT_TOKEN_PROXY_CLIENT_ID=Iv23li... GIT_TOKEN_PROXY_PRIVATE_KEY=./app.pem git-token-proxy serve
  git-token-proxy serve --config ./fake/config.yaml --log-format text      (after python -m proxy.testing)

Every flag has a GIT_TOKEN_PROXY_* variable (in brackets); a flag wins over its variable."""
_CHECK_EXAMPLES = """\
  git-token-proxy check --config config.yaml
  git-token-proxy check --config config.yaml --repo github.com/acme/app     (also looks it up and mints)"""
_HEALTH_EXAMPLES = """\
  git-token-proxy healthcheck --port 8080
  git-token-proxy healthcheck --ready --config /etc/git-token-proxy/config.yaml
In a container whose PID 1 is `git-token-proxy serve`, its flags are used: HEALTHCHECK needs none."""
_DEMO_EXAMPLES = """\
  git-token-proxy demo"""
_GRANT_EXAMPLES = """\
  openssl ecparam -genkey -name prime256v1 -noout | openssl pkcs8 -topk8 -nocrypt > issuer.pem
  git-token-proxy jwks --key issuer.pem > issuer.jwks.json          (the proxy's access.issuers[].jwksFile)
  git-token-proxy grant --key issuer.pem --issuer https://orchestrator.internal --audience git-token-proxy \\
    --sub run-42 --ttl 2h --scope '{"repos": ["github\\\\.com/acme/app"]}' > /run/sandbox-42/token"""
_JWKS_EXAMPLES = """\
  git-token-proxy jwks --key issuer.pem > issuer.jwks.json"""
_HELPER_EXAMPLES = """\
  git config --global credential.http://127.0.0.1:8080.helper \\
    '!git-token-proxy credential-helper --token-file /var/run/secrets/tokens/git-token-proxy'"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="git-token-proxy",
        description="Git smart-HTTP proxy that adds GitHub tokens so clients need none.",
        epilog="Run `git-token-proxy COMMAND --help` for a command's own arguments and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands, "serve", "run the proxy (from --config PATH, or GIT_TOKEN_PROXY_* variables)", _SERVE_EXAMPLES
    )
    sources.add_arguments(serve, sources.CONFIG, *sources.LISTEN_VARIABLES, *sources.APP_VARIABLES)
    _add_logging(serve, "INFO", with_format=True)
    serve.add_argument("--watch", action="store_true", help="reload the config when the file changes (also: SIGHUP)")
    serve.set_defaults(run=_serve)

    check = _command(
        commands, "check", "validate a config, prove its credentials, list its auth entries", _CHECK_EXAMPLES
    )
    sources.add_arguments(check, sources.CONFIG, *sources.APP_VARIABLES)
    check.add_argument(
        "--repo", metavar="HOST/OWNER/REPO", help="also resolve this repo (github.com/acme/app), look it up and mint"
    )
    check.add_argument("--allow-empty", action="store_true", help="a config without auth entries passes")
    _add_logging(check, "WARNING")
    check.set_defaults(run=_check)

    health = _command(
        commands, "healthcheck", "ask the running proxy's /healthz (for Docker's HEALTHCHECK)", _HEALTH_EXAMPLES
    )
    sources.add_arguments(health, sources.CONFIG, *sources.LISTEN_VARIABLES)
    health.add_argument("--ready", action="store_true", help="ask /readyz instead")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="give up after (default 3)")
    health.set_defaults(run=_healthcheck)

    demo = _command(commands, "demo", "clone a private repo from a local fake GitHub through the proxy", _DEMO_EXAMPLES)
    _add_logging(demo, "WARNING")
    demo.set_defaults(run=_demo)

    grant = _command(commands, "grant", "print a signed JWT for a client (small setups and tests)", _GRANT_EXAMPLES)
    grant.add_argument("--key", required=True, type=Path, metavar="PATH", help="the issuer's private key (PEM)")
    grant.add_argument("--issuer", required=True, metavar="URL", help="the `iss` claim, as access.issuers[].issuer")
    grant.add_argument("--audience", required=True, metavar="AUDIENCE", help="the `aud` claim (git-token-proxy)")
    grant.add_argument("--sub", required=True, metavar="SUBJECT", help="the `sub` claim: who the client is")
    grant.add_argument("--ttl", required=True, metavar="DURATION", help="how long it is valid: 30m, 2h, 1d")
    grant.add_argument("--scope", metavar="JSON", help='narrows the issuer\'s scope: {"repos", "readOnly", "push"}')
    grant.add_argument("--kid", metavar="KID", help="the key id (default: the key's RFC 7638 thumbprint)")
    grant.add_argument("--scope-claim", default="git_token_proxy", metavar="NAME", help="default git_token_proxy")
    grant.set_defaults(run=_grant)

    jwks = _command(commands, "jwks", "print the JWKS of a key's public half (for access.issuers[].jwksFile)",
                    _JWKS_EXAMPLES)  # fmt: skip
    jwks.add_argument("--key", required=True, type=Path, metavar="PATH", help="a private or public key (PEM)")
    jwks.add_argument("--kid", metavar="KID", help="the key id (default: the key's RFC 7638 thumbprint)")
    jwks.set_defaults(run=_jwks)

    summary = "git credential helper: answers git with the token a file holds now"
    helper = _command(commands, "credential-helper", summary, _HELPER_EXAMPLES)
    helper.add_argument("--token-file", required=True, type=Path, metavar="PATH", help="the file holding the token")
    helper.add_argument("action", metavar="ACTION", help="what git asks: get (store and erase do nothing)")
    helper.set_defaults(run=_credential_helper)
    return parser


def _add_logging(parser: argparse.ArgumentParser, default: str, with_format: bool = False) -> None:
    """Defaults come from GIT_TOKEN_PROXY_LOG_LEVEL and _LOG_FORMAT when set (resolved in `_logging_settings`, so
    that a bad value names its variable)."""
    parser.add_argument(
        "--log-level", type=_log_level, default=None, metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (default {default}) [{sources.LOG_LEVEL.env}]",
    )  # fmt: skip
    parser.set_defaults(default_log_level=default)
    if with_format:
        parser.add_argument(
            "--log-format", choices=LOG_FORMATS, default=None,
            help=f"json lines (the default), or text for terminals [{sources.LOG_FORMAT.env}]",
        )  # fmt: skip


def _logging_settings(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The log level and format: a flag, else its variable, else the command's default."""
    level = args.log_level
    if level is None:
        from_environment = environ.get(sources.LOG_LEVEL.env, "").strip()
        if from_environment and from_environment.upper() not in LOG_LEVELS:
            raise ConfigError(
                f"{sources.LOG_LEVEL.env}: {from_environment!r} is not a log level; use one of {', '.join(LOG_LEVELS)}"
            )
        level = from_environment.upper() or args.default_log_level
    log_format = getattr(args, "log_format", None)
    if log_format is None:
        from_environment = environ.get(sources.LOG_FORMAT.env, "").strip().lower()
        if from_environment and from_environment not in LOG_FORMATS:
            raise ConfigError(f"{sources.LOG_FORMAT.env}: {from_environment!r} is not json or text")
        log_format = from_environment or "json"
    return level, log_format


def _warn_unknown_variables(loaded: sources.LoadedConfig) -> None:
    text = ""
    if loaded.path is not None:
        with contextlib.suppress(OSError):
            text = loaded.path.read_text(errors="replace")
    for warning in sources.unknown_variables(os.environ, text):
        log.warning("%s", warning)


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    level, log_format = _logging_settings(args)
    loaded = sources.load(args)
    sources.check_keys(loaded)
    config = loaded.config
    config.server.refuse_unsafe_bind(loaded.host, has_clients=config.access.enabled)
    redactor = configure_logging(level, secrets=config.secrets, log_format=log_format)
    try:
        _try_listening(loaded)
        _warn_unknown_variables(loaded)
        _log_start_up(loaded)
        reload_from = sources.reloadable_path(loaded)
        return asyncio.run(
            serve(config, reload_from, loaded.host, loaded.port, args.watch, redactor, loaded.server_overrides)
        )
    except OSError as error:
        raise StartupError(_listen_problem(error, loaded)) from None


def _try_listening(loaded: sources.LoadedConfig) -> None:
    """Binds each address once and lets go, before anything is logged: a port in use is then the only line the
    user sees, rather than the last one after a start-up banner. (`serve` binds again; a race in between is still
    reported, one line as well.)"""
    server = loaded.config.server
    wanted = [(loaded.host, loaded.port)]
    if server.metrics_port is not None:
        wanted.append((server.metrics_host or loaded.host, server.metrics_port))
    for host, port in wanted:
        if port != 0:
            socket.create_server((host, port)).close()  # SO_REUSEADDR, as the real listener will have


def _log_start_up(loaded: sources.LoadedConfig) -> None:
    """What a user needs to point git at the proxy, with the real address, and warnings about the address."""
    if not is_loopback(loaded.host):
        log.warning("listening on %s, which is not a loopback address", loaded.host)
    for line in insteadof_lines(loaded.config, loaded.host, loaded.port):
        log.info("clients: %s", line)
    if loaded.config.access.enabled and loaded.port != 0:
        # With access control, git must also send a client token: without it, it asks for a password.
        proxy = f"http://{sources.client_address(loaded.host, loaded.port)}"
        log.info("clients: and their token, from a file: %s", credential_line(proxy))
    for entry in loaded.config.auth:
        if isinstance(entry, GitHubAppEntry) and entry.client_id and entry.app_id is not None:
            log.warning(
                "entry %r: both clientId and appId are set; JWTs are signed with clientId %r "
                "(`git-token-proxy check` tells whether appId %d is the same app)",
                entry.id, entry.client_id, entry.app_id,
            )  # fmt: skip


TOKEN_FILE = "~/.git-token-proxy-token"


def credential_line(proxy: str) -> str:
    """A credential helper that answers git with the token in a file, read on every call (never in the URL, nor
    in git's config): a static client token, or a JWT that an orchestrator or the kubelet rotates in place."""
    helper = f"!git-token-proxy credential-helper --token-file {TOKEN_FILE}"
    return f"git config --global credential.{proxy}.helper '{helper}'"


def insteadof_lines(config: Config, host: str, port: int) -> list[str]:
    """The one `git config` line per upstream that sends its repos through the proxy."""
    if port == 0:
        return []  # the port is chosen when binding: the "listening on" line has it
    lines = []
    for upstream in config.upstreams:
        # Clients name repos by the upstream's public URL; a url pointing elsewhere (a mirror) is the proxy's
        # business, and clients keep https://<host>/.
        public = upstream.url if upstream.url.split("://", 1)[1] == upstream.host else f"https://{upstream.host}"
        proxy = f"http://{sources.client_address(host, port)}/{upstream.host}/"
        lines.append(f'git config --global url."{proxy}".insteadOf "{public}/"')
    return lines


_BOUND_PORT = re.compile(r"address \(.*?, (\d+)\)")
_LISTEN_FIXES = {
    errno.EADDRINUSE: "another process holds it: stop that process or choose another port",
    errno.EACCES: "ports below 1024 need privileges: choose a port of 1024 or more",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address: use 127.0.0.1, or one of its own",
}


def _listen_problem(error: OSError, loaded: sources.LoadedConfig) -> str:
    """`[Errno 98] error while attempting to bind on address ('127.0.0.1', 8080): ...` said as the setting."""
    server = loaded.config.server
    found = _BOUND_PORT.search(str(error))
    port = int(found.group(1)) if found else loaded.port
    if server.metrics_port is not None and port == server.metrics_port and port != loaded.port:
        where = f"{sources.client_address(server.metrics_host or loaded.host, port)} (server.metricsPort)"
    else:
        where = f"{sources.client_address(loaded.host, port)} (--port / server.port / {sources.PORT.env})"
    reason = (error.strerror or str(error)).lower()
    fix = _LISTEN_FIXES.get(error.errno or 0, "check the host and port")
    return f"cannot listen on {where}: {reason}; {fix}"


def _check(args: argparse.Namespace) -> int:
    from .check import run_check

    level, _ = _logging_settings(args)
    configure_logging(level)
    loaded = sources.load(args)
    sources.check_keys(loaded)
    _warn_unknown_variables(loaded)
    return asyncio.run(run_check(loaded.config, loaded.source, args.repo, allow_empty=args.allow_empty))


def _healthcheck(args: argparse.Namespace) -> int:
    from .healthcheck import address_url, probe, probe_url, serve_args_of_pid1

    # In a container, PID 1 is the `serve` to ask about: its flags (say `--port 9000`) count, not only the
    # variables both processes share. Elsewhere, the healthcheck's own flags and variables.
    ready, timeout = args.ready, args.timeout
    serve_argv = None if sources.settings_of(args, {}) else serve_args_of_pid1()
    if serve_argv is not None:
        args = _parser().parse_args(["serve", *serve_argv])
    settings = sources.settings_of(args, os.environ)
    needs_config = sources.CONFIG in settings or any(v in settings for v in sources.APP_VARIABLES)
    if sources.PORT in settings and not needs_config:  # a port is all a probe needs
        port = sources.parse_port(settings[sources.PORT], sources.PORT.label)
        return probe(address_url(settings.get(sources.HOST, "127.0.0.1"), port, ready), timeout)
    return probe(probe_url(sources.load(args), ready), timeout)


def _grant(args: argparse.Namespace) -> int:
    from .access.grants import GrantError, grant
    from .config import parse_duration

    try:
        ttl = parse_duration(args.ttl)
        print(grant(args.key, issuer=args.issuer, audience=args.audience, subject=args.sub, ttl=ttl,
                    scope=args.scope, kid=args.kid, scope_claim=args.scope_claim))  # fmt: skip
    except (GrantError, ValueError) as error:
        raise StartupError(f"grant: {error}") from None
    return 0


def _jwks(args: argparse.Namespace) -> int:
    from .access.grants import GrantError, jwks_document

    try:
        print(json.dumps(jwks_document(args.key, args.kid), indent=2))
    except GrantError as error:
        raise StartupError(f"jwks: {error}") from None
    return 0


def _credential_helper(args: argparse.Namespace) -> int:
    from .credential_helper import credential_helper  # `git-token-proxy` itself dispatches it before this loads

    return credential_helper(args.action, args.token_file, sys.stdin, sys.stdout, sys.stderr)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo pulls in the test fake; serve never needs it

    configure_logging(_logging_settings(args)[0])
    return asyncio.run(run_demo())
