"""Serve: run until SIGTERM or SIGINT, then drain transfers; reload the config on SIGHUP or when the file changes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from . import __version__
from .app import PROXY, Proxy, create_app, create_ops_app
from .config import Config, ConfigError, GitHubAppEntry, load_config
from .credentials.keys import key_file_of
from .logs import Redactor

log = logging.getLogger("git_token_proxy.serve")
WATCH_INTERVAL = 2.0


async def serve(config: Config, config_path: Path, host: str, port: int, watch: bool, redactor: Redactor) -> int:
    app = await create_app(config)
    proxy = app[PROXY]
    proxy.bound_host = host
    # handle_signals=False: this function owns SIGTERM, so that /readyz can say "draining" while transfers finish.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=config.server.shutdown_grace)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    ops_runner = await _start_ops_site(proxy, host)
    log.info("git-token-proxy %s listening on http://%s:%d", __version__, host, port)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_config(proxy, config_path, redactor))
    watcher = asyncio.create_task(_watch(proxy, config_path, redactor)) if watch else None

    await stop.wait()
    started = loop.time()
    proxy.draining = True  # /readyz answers 503 from now on
    log.info("stopping: no new connections; in-flight transfers get up to %.0f s", config.server.shutdown_grace)
    if watcher:
        watcher.cancel()
    # A second SIGTERM or SIGINT (an impatient operator) ends the drain at once.
    forced = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, forced.set)
    drain = asyncio.create_task(runner.cleanup())  # stop listening, wait for transfers (up to the grace), close
    await asyncio.wait([drain, asyncio.create_task(forced.wait())], return_when=asyncio.FIRST_COMPLETED)
    if ops_runner:
        await ops_runner.cleanup()
    if not drain.done():
        log.warning("stopped by a second signal after %.1f s; transfers still running were cut", loop.time() - started)
        return 1
    log.info("stopped after %.1f s of draining", loop.time() - started)
    return 0


async def _start_ops_site(proxy: Proxy, host: str) -> web.AppRunner | None:
    server = proxy.config.server
    if server.metrics_port is None:
        return None
    runner = web.AppRunner(create_ops_app(proxy), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, server.metrics_host or host, server.metrics_port).start()
    log.info("metrics and probes on http://%s:%d", server.metrics_host or host, server.metrics_port)
    return runner


def reload_config(proxy: Proxy, path: Path, redactor: Redactor) -> bool:
    """Atomic: the new config fully loads (keys included) or the running one stays, with the reason logged."""
    try:
        config = load_config(path)
        redactor.add_secrets(config.secrets)
        proxy.reload(config)
    except ConfigError as error:
        log.error("reload rejected; the running configuration stays: %s", error)
        return False
    return True


async def _watch(proxy: Proxy, path: Path, redactor: Redactor) -> None:
    """Polls the content of the config, its key files and its secret files: it survives editors that replace
    files and Kubernetes' symlink swaps alike, and a rotated Secret is picked up like an edited ConfigMap."""
    last = _digest(_watched_files(path, proxy.config))
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        current = _digest(_watched_files(path, proxy.config))
        if current is not None and current != last:
            last = current
            log.info("%s or a file it names changed; reloading", path)
            reload_config(proxy, path, redactor)


def _watched_files(path: Path, config: Config) -> list[Path]:
    apps = [e for e in config.auth if isinstance(e, GitHubAppEntry)]
    keys = [file for e in apps if (file := key_file_of(e.private_key.get_secret_value())) is not None]
    return [path, *config.github.app_installation.secret_files, *keys]


def _digest(paths: list[Path]) -> bytes | None:
    digest = hashlib.sha256()
    try:
        for path in paths:
            digest.update(path.read_bytes())
    except OSError:
        return None  # mid-swap or briefly missing: keep what runs, look again later
    return digest.digest()
