"""CLI: `serve`, `check` and `demo`. Config errors end here as one readable message and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import ConfigError, is_loopback, load_config
from .logs import configure_logging

log = logging.getLogger("git_token_proxy")

EXIT_CONFIG_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as error:
        print(f"git-token-proxy: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as error:
        # What the config names but cannot be had, such as a port already in use: one line, not a traceback.
        print(f"git-token-proxy: {error}", file=sys.stderr)
        return 1
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
    serve.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="json lines, or text for terminals"
    )
    serve.add_argument("--watch", action="store_true", help="reload the config when the file changes (also: SIGHUP)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a config and list its auth entries")
    check.add_argument("--config", required=True, help="YAML config file")
    check.add_argument("--repo", help="also resolve this repo (e.g. github.com/acme/app), look it up and mint")
    check.add_argument("--log-level", default="WARNING")
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="clone a private repo from a local fake GitHub through the proxy")
    demo.add_argument("--log-level", default="WARNING")
    demo.set_defaults(run=_demo)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    config = load_config(args.config)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    config.server.refuse_unsafe_bind(host, has_clients=bool(config.access.clients))
    redactor = configure_logging(args.log_level, secrets=config.secrets, log_format=args.log_format)
    if not is_loopback(host):
        log.warning("listening on %s, which is not a loopback address", host)
    return asyncio.run(serve(config, Path(args.config), host, port, args.watch, redactor))


def _check(args: argparse.Namespace) -> int:
    from .check import run_check

    configure_logging(args.log_level)
    return asyncio.run(run_check(load_config(args.config), args.config, args.repo))


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo pulls in the test fake; serve never needs it

    configure_logging(args.log_level)
    return asyncio.run(run_demo())
