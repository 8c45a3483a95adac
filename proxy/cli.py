"""CLI: `serve`, `check`, `healthcheck` and `demo`. Every mistake a user can make ends here as one line naming the
thing and the fix, with exit status 2; never as a traceback."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import re
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from . import env_config as sources
from .config import Config, ConfigError, GitHubAppEntry, is_loopback
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
        """One line instead of argparse's usage block: the mistake, and where the usage is."""
        self.exit(EXIT_CONFIG_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="git-token-proxy", description="Git smart-HTTP proxy that adds GitHub tokens so clients need none."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy (from --config FILE, or GIT_TOKEN_PROXY_* variables)")
    sources.add_arguments(serve)
    serve.add_argument("--log-level", type=_log_level, default="INFO", help=", ".join(LOG_LEVELS))
    serve.add_argument("--log-format", choices=LOG_FORMATS, default="json", help="json lines, or text for terminals")
    serve.add_argument("--watch", action="store_true", help="reload the config when the file changes (also: SIGHUP)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a config, prove its credentials, list its auth entries")
    sources.add_arguments(check)
    check.add_argument("--repo", help="also resolve this repo (e.g. github.com/acme/app), look it up and mint")
    check.add_argument("--allow-empty", action="store_true", help="a config without auth entries passes")
    check.add_argument("--log-level", type=_log_level, default="WARNING")
    check.set_defaults(run=_check)

    health = commands.add_parser("healthcheck", help="ask the running proxy's /healthz (for Docker's HEALTHCHECK)")
    sources.add_arguments(health)
    health.add_argument("--ready", action="store_true", help="ask /readyz instead")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.set_defaults(run=_healthcheck)

    demo = commands.add_parser("demo", help="clone a private repo from a local fake GitHub through the proxy")
    demo.add_argument("--log-level", type=_log_level, default="WARNING")
    demo.set_defaults(run=_demo)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    loaded = sources.load(args)
    sources.check_keys(loaded)
    config = loaded.config
    config.server.refuse_unsafe_bind(loaded.host, has_clients=bool(config.access.clients))
    redactor = configure_logging(args.log_level, secrets=config.secrets, log_format=args.log_format)
    try:
        _try_listening(loaded)
        _log_start_up(loaded)
        reload_from = sources.reloadable_path(loaded)
        return asyncio.run(serve(config, reload_from, loaded.host, loaded.port, args.watch, redactor))
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
    for entry in loaded.config.auth:
        if isinstance(entry, GitHubAppEntry) and entry.client_id and entry.app_id is not None:
            log.warning(
                "entry %r: both clientId and appId are set; JWTs are signed with clientId %r "
                "(`git-token-proxy check` tells whether appId %d is the same app)",
                entry.id, entry.client_id, entry.app_id,
            )  # fmt: skip


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

    configure_logging(args.log_level)
    loaded = sources.load(args)
    sources.check_keys(loaded)
    return asyncio.run(run_check(loaded.config, loaded.source, args.repo, allow_empty=args.allow_empty))


def _healthcheck(args: argparse.Namespace) -> int:
    from .healthcheck import probe, serve_args_of_pid1

    # In a container, PID 1 is the `serve` to ask about: its flags (say `--port 9000`) count, not only the
    # variables both processes share. Elsewhere, the healthcheck's own flags and variables.
    ready, timeout = args.ready, args.timeout
    serve_argv = None if sources.settings_of(args, {}) else serve_args_of_pid1()
    if serve_argv is not None:
        args = _parser().parse_args(["serve", *serve_argv])
    return probe(sources.load(args), ready=ready, timeout=timeout)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo pulls in the test fake; serve never needs it

    configure_logging(args.log_level)
    return asyncio.run(run_demo())
