"""`python -m proxy.testing`: the fake GitHub as a command, for trying the quick start without a GitHub App.

    python -m proxy.testing --port 9000 --repo acme/app --write-config ./fake

serves a fake github.com (real `git http-backend`, GitHub's App API and rules) holding `acme/app`, with a freshly
made GitHub App installed on every owner named, writes `./fake/config.yaml` (and the app's key beside it) for
`git-token-proxy serve`, prints the commands to run next, and serves until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
import tempfile
from pathlib import Path

import yaml

from .harness import build_fake, proxy_config

_REPO = re.compile(r"^[A-Za-z0-9._-]{1,100}/[A-Za-z0-9._-]{1,100}$")
PROXY_PORT = 8080


def _repo(text: str) -> str:
    if not _REPO.match(text) or text.endswith(".git"):
        raise argparse.ArgumentTypeError(f"{text!r} is not OWNER/NAME (e.g. acme/app)")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.testing", description="Serve a fake GitHub, for the quick start without a GitHub App.",
        epilog="example: python -m proxy.testing --port 9000 --repo acme/app --write-config ./fake",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=9000, metavar="PORT", help="where it listens (default 9000)")
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDRESS", help="(default 127.0.0.1)")
    parser.add_argument("--repo", type=_repo, action="append", required=True, metavar="OWNER/NAME",
                        help="a private repo to hold, with a README; give it more than once for more")  # fmt: skip
    parser.add_argument(
        "--write-config", type=Path, metavar="DIR",
        help="write DIR/config.yaml for `git-token-proxy serve`, and the app's key beside it",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 0
    except OSError as error:
        print(f"python -m proxy.testing: cannot serve on {args.host}:{args.port}: {error.strerror or error}",
              file=sys.stderr)  # fmt: skip
        return 1


async def _serve(args: argparse.Namespace) -> int:
    folder = args.write_config or Path(tempfile.mkdtemp(prefix="fake-github-"))
    repos = {name: {"README.md": f"# {name}\n\nServed by the fake GitHub (python -m proxy.testing).\n".encode()}
             for name in args.repo}  # fmt: skip
    fake, app, key_file = await asyncio.to_thread(build_fake, folder.absolute(), repos)
    url = await fake.start(args.host, args.port)
    try:
        config_file = folder / "config.yaml"
        if args.write_config is not None:
            config_file.write_text(yaml.safe_dump(proxy_config(url, app, key_file), sort_keys=False))
        _say_what_next(url, args.repo, config_file if args.write_config is not None else None, app.client_id, key_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await fake.close()
    return 0


def _say_what_next(url: str, repos: list[str], config_file: Path | None, client_id: str, key_file: Path) -> None:
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    print(f"fake GitHub on {url}: {', '.join(repos)} (private), a GitHub App installed on every owner", flush=True)
    print("\nIn another terminal, start the proxy in front of it, with the file:", flush=True)
    if config_file is not None:
        print(f"  git-token-proxy serve --config {config_file} --log-format text", flush=True)
    print("or without a file, from the environment:", flush=True)
    print(f"  GIT_TOKEN_PROXY_CLIENT_ID={client_id} GIT_TOKEN_PROXY_PRIVATE_KEY={key_file} \\", flush=True)
    print(f"  GIT_TOKEN_PROXY_UPSTREAM_URL={url} GIT_TOKEN_PROXY_API_URL={url} \\", flush=True)
    print("  git-token-proxy serve --log-format text", flush=True)
    print("\nthen point git at the proxy and clone, exactly as in the quick start:", flush=True)
    print(f'  git config --global url."{proxy}/github.com/".insteadOf "https://github.com/"', flush=True)
    print(f"  git clone https://github.com/{repos[0]}", flush=True)
    print("\nCtrl-C stops the fake.", flush=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
