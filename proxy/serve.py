"""Serve: run until SIGTERM or SIGINT, then drain transfers; reload the config on SIGHUP or when the file changes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import web

from . import __version__
from .app import create_app
from .config import CONFIG_MAX_BYTES, Config, ConfigError, GitHubAppEntry, load_config
from .credentials.keys import key_file_of
from .files import file_kind, read_regular_file
from .forward.guards import RUNNER_ARGS
from .health import create_ops_app
from .logs import Redactor
from .running import PROXY, Proxy

log = logging.getLogger("git_token_proxy.serve")
WATCH_INTERVAL = 2.0


async def serve(
    config: Config,
    config_path: Path,
    host: str,
    port: int,
    watch: bool,
    redactor: Redactor,
    server_overrides: Mapping[str, object] | None = None,
) -> int:
    app = await create_app(config)
    proxy = app[PROXY]
    proxy.bound_host, proxy.server_overrides = host, dict(server_overrides or {})
    reloader = Reloader(proxy, config_path, redactor)
    # Before the first request: a file changed once the proxy answers is a change.
    watcher = await ConfigWatcher.taking_stock(proxy, config_path, reloader) if watch else None
    # What start-up made (modules, the config, aiohttp's tables) lives as long as the process; frozen, the cyclic
    # collector stops walking it again and again as requests allocate: a warm info/refs costs ~10 % less CPU.
    gc.collect()
    gc.freeze()
    # handle_signals=False: this function owns SIGTERM, so that /readyz can say "draining" while transfers finish.
    runner = web.AppRunner(
        app,
        **RUNNER_ARGS,
        handle_signals=False,
        shutdown_timeout=config.server.shutdown_grace,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        ops_runner = await _start_ops_site(proxy, host)
    except OSError:  # a port in use: the CLI says so in one line; the sessions the app opened are closed first
        await runner.cleanup()
        raise
    log.info("git-token-proxy %s listening on http://%s:%d", __version__, host, port)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    watching = None
    if watcher is not None:
        watching = asyncio.create_task(keep_running(watcher.poll, WATCH_INTERVAL, "config watcher"))

    await stop.wait()
    started = loop.time()
    proxy.draining, proxy.stopping_since = True, time.monotonic()  # /readyz answers 503 from now on
    log.info("stopping: no new connections; in-flight transfers get up to %.0f s", config.server.shutdown_grace)
    reloader.cancel()
    if watching:
        watching.cancel()
    # A second SIGTERM or SIGINT (an impatient operator) ends the drain at once.
    forced = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, forced.set)
    drain = asyncio.create_task(_drain(runner, config.server.drain_delay, forced))
    await asyncio.wait([drain, asyncio.create_task(forced.wait())], return_when=asyncio.FIRST_COMPLETED)
    if ops_runner:
        await ops_runner.cleanup()
    if not drain.done():
        log.warning("stopped by a second signal after %.1f s; transfers still running were cut", loop.time() - started)
        return 1
    log.info("stopped after %.1f s of draining", loop.time() - started)
    return 0


async def _drain(runner: web.AppRunner, delay: float, forced: asyncio.Event) -> None:
    """Keep listening for `drainDelay` first, answering /readyz with 503 "draining" on every port, so that a load
    balancer or kube-proxy takes the proxy out of rotation before it stops accepting; then stop listening and wait
    for transfers (up to the grace), and close. A second signal cuts the delay short too."""
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(forced.wait(), delay)
    await runner.cleanup()


async def _start_ops_site(proxy: Proxy, host: str) -> web.AppRunner | None:
    server = proxy.config.server
    if server.metrics_port is None:
        return None
    runner = web.AppRunner(create_ops_app(proxy), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, server.metrics_host or host, server.metrics_port).start()
    log.info("metrics and probes on http://%s:%d", server.metrics_host or host, server.metrics_port)
    return runner


async def reload_config(proxy: Proxy, path: Path, redactor: Redactor) -> bool:
    """Atomic: the new config fully loads (keys included) or the running one stays, with the reason logged once.
    Files are read and parsed in a thread: a huge, hostile or blocking file must not stall /healthz or transfers."""
    try:
        config = await asyncio.to_thread(load_config, path)
        redactor.add_secrets(config.secrets)
        await proxy.reload(config)
    except ConfigError as error:
        log.error("reload rejected; the running configuration stays: %s", error)
        return False
    except Exception:
        # A bug rather than a bad file: it must not end the process, nor the watcher that asked for the reload.
        log.exception("reload failed unexpectedly; the running configuration stays")
        return False
    return True


class Reloader:
    """Reloads one at a time, whoever asks (SIGHUP or the watcher), so that two never race to swap the config."""

    def __init__(self, proxy: Proxy, path: Path, redactor: Redactor) -> None:
        self._proxy, self._path, self._redactor = proxy, path, redactor
        self._lock = asyncio.Lock()
        self._queued = False  # a SIGHUP's reload is waiting for the lock
        self._tasks: set[asyncio.Task[bool]] = set()  # strong references: the loop keeps only weak ones

    def request(self) -> None:
        """The SIGHUP handler. A SIGHUP during a reload runs one more after it, since the file may have changed
        after that reload read it; further SIGHUPs while that one waits add nothing, it will read the newest file."""
        if self._queued:
            return
        self._queued = True
        task = asyncio.create_task(self._reload_when_free())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_when_free(self) -> bool:
        async with self._lock:
            self._queued = False
            return await reload_config(self._proxy, self._path, self._redactor)

    async def reload(self) -> bool:
        async with self._lock:
            return await reload_config(self._proxy, self._path, self._redactor)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()  # the swap happens after the last await, so a cancelled reload changes nothing


async def keep_running(poll: Callable[[], Awaitable[None]], interval: float, name: str) -> None:
    """Calls `poll` every `interval` seconds until cancelled. A background task must outlive any failure of one
    round, or it silently stops for good: each failure is logged with its traceback, once until a round succeeds
    or fails differently, so that a persistent problem does not flood the log every few seconds."""
    last_failure: str | None = None
    while True:
        try:
            await poll()
            last_failure = None
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
            if failure != last_failure:
                log.exception("%s failed; it carries on (logged again only if the failure changes)", name)
            last_failure = failure
        await asyncio.sleep(interval)


class ConfigWatcher:
    """Polls the content of the config, its key files and its secret files: it survives editors that replace
    files and Kubernetes' symlink swaps alike, and a rotated Secret is picked up like an edited ConfigMap."""

    def __init__(self, proxy: Proxy, path: Path, reloader: Reloader, stock: bytes | None) -> None:
        self._proxy, self._path, self._reloader = proxy, path, reloader
        self._last = stock  # what the files held when last looked at; None: one of them was missing
        # A config that loaded but was rejected (say, its new key file is not there yet: ConfigMaps and Secrets
        # update separately). Its files are watched too, so the reload happens when the missing one appears.
        self._rejected: Config | None = None

    @classmethod
    async def taking_stock(cls, proxy: Proxy, path: Path, reloader: Reloader) -> ConfigWatcher:
        """A watcher that starts from what the files hold now, before the proxy serves: only what changes after it
        answers is reloaded. A file missing right now (a Secret mid-swap) counts as a state of its own, so the
        file that then appears is a change, not the starting point."""
        return cls(proxy, path, reloader, await asyncio.to_thread(_digest, _watched_files(path, proxy.config)))

    async def poll(self) -> None:
        current = await asyncio.to_thread(_digest, *self._files())  # file reads never run on the event loop
        if current is None:
            return  # a file is missing or mid-swap: keep what runs, look again later
        if current != self._last:
            log.info("%s or a file it names changed; reloading", self._path)
            # The files only the new config names are looked at *before* the reload reads them: one that appears
            # after a rejected reload read it (a Secret landing just after its ConfigMap) is then a change.
            candidate = await asyncio.to_thread(_loadable, self._path)
            before = await asyncio.to_thread(_digest, *self._files(candidate))
            if await self._reloader.reload():
                self._rejected = None
            else:
                self._rejected, current = candidate, before or current
        self._last = current  # even when rejected: the same content is not retried, nor its rejection logged again

    def _files(self, other: Config | None = None) -> tuple[list[Path], list[Path]]:
        """The running config's files, and those only the rejected one (or `other`) names (which may not exist
        yet)."""
        files = _watched_files(self._path, self._proxy.config)
        hoped = other or self._rejected
        if hoped is None:
            return files, []
        return files, [file for file in _watched_files(self._path, hoped) if file not in files]


def _loadable(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError:
        return None


def _watched_files(path: Path, config: Config) -> list[Path]:
    apps = [e for e in config.auth if isinstance(e, GitHubAppEntry)]
    keys = [file for e in apps if (file := key_file_of(e.private_key.get_secret_value())) is not None]
    jwks = [issuer.jwks_file for issuer in config.access.issuers if issuer.jwks_file is not None]
    return [path, *config.github.app_installation.secret_files, *keys, *jwks]


def _digest(paths: list[Path], hoped_for: list[Path] | None = None) -> bytes | None:
    """None while a file the running config needs is missing or mid-swap. A file only a rejected config names
    counts as "missing" instead: its appearance is a change, and its absence must not hide other changes."""
    digest = hashlib.sha256()
    try:
        for path in paths:
            digest.update(_file_digest(path))
    except OSError:
        return None
    for path in hoped_for or []:
        try:
            digest.update(_file_digest(path))
        except OSError:
            digest.update(b"missing")
    return digest.digest()


def _file_digest(path: Path) -> bytes:
    """What the file is and holds, read with the config's bounds. A FIFO, a device or a huge file is not read:
    its kind or size stands for its content, so that replacing a file with one still triggers a reload, and that
    reload rejects it with the reason."""
    status = path.stat()
    kind = file_kind(status.st_mode)
    if kind is not None:
        return kind.encode()
    try:
        return hashlib.sha256(read_regular_file(path, CONFIG_MAX_BYTES)).digest()
    except OSError as error:
        if error.errno != errno.EFBIG:
            raise
        return f"large:{status.st_size}:{status.st_mtime_ns}".encode()
