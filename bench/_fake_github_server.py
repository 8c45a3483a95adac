"""Serves an existing FakeGitHub root in its own process, so the benchmark's clients and servers never share a GIL."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from pathlib import Path

from aiohttp import web

from proxy.testing import FakeGitHub


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="a FakeGitHub root whose repos already exist")
    parser.add_argument("--token", required=True, help="token to accept for every repo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port; the URL is printed either way")
    parser.add_argument("--cert", type=Path, help="serve HTTPS with this certificate (PEM); needs --key")
    parser.add_argument("--key", type=Path, help="the certificate's private key (PEM)")
    return parser.parse_args()


async def start_tls(fake: FakeGitHub, host: str, port: int, cert: Path, key: Path) -> tuple[web.AppRunner, str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(fake.make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=context).start()
    return runner, f"https://{host}:{runner.addresses[0][1]}"


async def serve_until_signalled(
    root: Path, token: str, host: str, port: int, cert: Path | None = None, key: Path | None = None
) -> None:
    # Grants live in memory only, so the token the parent added while building the repo is unknown here.
    fake = FakeGitHub(root=root)
    fake.add_token(token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = None
    if cert is not None and key is not None:
        runner, url = await start_tls(fake, host, port, cert, key)
    else:
        url = await fake.start(host, port)
    # The parent blocks on this one line; flush, or it would sit in the pipe buffer until exit.
    print(url, flush=True)
    try:
        await stop.wait()
    finally:
        await fake.close()
        if runner is not None:
            await runner.cleanup()


def main() -> None:
    args = parse_args()
    asyncio.run(serve_until_signalled(args.root, args.token, args.host, args.port, args.cert, args.key))


if __name__ == "__main__":
    main()
