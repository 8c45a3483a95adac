"""CLI: `serve`, `check` and `demo`. Config errors end here as one readable message and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from . import __version__
from .app import build_router, create_app
from .config import Config, ConfigError, OAuthTokenEntry, load_config
from .logs import configure_logging
from .routing import base_url_host

log = logging.getLogger("git_token_proxy")

EXIT_CONFIG_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as error:
        print(f"git-token-proxy: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="git-token-proxy", description="Git smart-HTTP proxy that adds GitHub tokens so clients need none."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a config and list its auth entries")
    check.add_argument("--config", required=True, help="YAML config file")
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="clone a private repo from a local fake GitHub through the proxy")
    demo.add_argument("--log-level", default="WARNING")
    demo.set_defaults(run=_demo)
    return parser


def _static_tokens(config: Config) -> list[str]:
    return [entry.token.get_secret_value() for entry in config.auth if isinstance(entry, OAuthTokenEntry)]


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    configure_logging(args.log_level, secrets=_static_tokens(config))
    if not _is_loopback(host):
        log.warning(
            "listening on %s, which is not a loopback address: anyone who can reach it can use this proxy's tokens",
            host,
        )
    log.info("git-token-proxy %s listening on http://%s:%d", __version__, host, port)
    # run_app handles SIGINT and SIGTERM: it stops accepting, lets requests finish, closes the upstream session.
    web.run_app(create_app(config), host=host, port=port, access_log=None, print=None, handle_signals=True)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    build_router(config)  # compiles every urlPattern; raises ConfigError naming the entry
    rows = [("ID", "TYPE", "URL PATTERN", "UPSTREAM")]
    for entry in config.auth:
        rows.append((entry.id, entry.type, entry.url_pattern, _upstream_of(entry.url_pattern, config)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])
    hosts = ", ".join(f"{u.host} -> {u.url}{'' if u.anonymous else ' (no anonymous)'}" for u in config.upstreams)
    print(f"\nupstreams: {hosts}")
    print(f"{args.config}: OK, {len(config.auth)} auth entries")
    return 0


def _upstream_of(pattern: str, config: Config) -> str:
    """Which configured upstream an entry's baseUrl names, so a pattern for an unlisted host stands out."""
    host = base_url_host(pattern)
    listed = {upstream.host for upstream in config.upstreams}
    return host if host in listed else f"(none: {host or '?'} is not in upstreams)"


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo pulls in the test fake; serve never needs it

    configure_logging(args.log_level)
    return asyncio.run(run_demo())
