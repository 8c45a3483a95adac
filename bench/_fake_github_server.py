"""Serves an existing FakeGitHub root in its own process, so the benchmark's clients and servers never share a GIL."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from proxy.testing import FakeGitHub


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="a FakeGitHub root whose repos already exist")
    parser.add_argument("--token", required=True, help="token to accept for every repo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port; the URL is printed either way")
    return parser.parse_args()


async def serve_until_signalled(root: Path, token: str, host: str, port: int) -> None:
    # Grants live in memory only, so the token the parent added while building the repo is unknown here.
    fake = FakeGitHub(root=root)
    fake.add_token(token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    url = await fake.start(host, port)
    # The parent blocks on this one line; flush, or it would sit in the pipe buffer until exit.
    print(url, flush=True)
    try:
        await stop.wait()
    finally:
        await fake.close()


def main() -> None:
    args = parse_args()
    asyncio.run(serve_until_signalled(args.root, args.token, args.host, args.port))


if __name__ == "__main__":
    main()
