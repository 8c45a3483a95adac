"""Health: liveness and readiness (each app's key proved against GitHub at start-up and after every reload), and
the ops routes (/healthz, /readyz, /metrics) on the git port, guarded like git paths, or on a port of their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler

from .errors import JwtRejected, ProxyError
from .forward import FORWARD_CONTEXT
from .forward.guards import check_host, refuse_browsers
from .logs import sanitise_for_client
from .running import PROXY, Proxy

if TYPE_CHECKING:
    from .credentials.github_app import GitHubAppSource

log = logging.getLogger("git_token_proxy.app")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Nothing else, so a GitHub outage never gets the pod restarted."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: config loaded and keys parsed (true once serving), not draining, and GitHub reachable if asked."""
    proxy = request.app[PROXY]
    if proxy.draining:
        return web.Response(status=503, text="draining: finishing transfers before shutdown\n")
    rejected = {k: why for k, why in proxy.rejected_apps.items() if k in proxy.app_sources}
    if rejected:
        said = "; ".join(f"{entry_id}: {why}" for entry_id, why in sorted(rejected.items()))
        return web.Response(status=503, text=f"GitHub rejects the key of {', '.join(sorted(rejected))}: {said}\n")
    readiness = proxy.config.readiness
    if readiness.check_github:
        now = time.monotonic()
        stale = [k for k in proxy.app_sources if now - proxy.github_ok_at.get(k, -math.inf) > readiness.max_age]
        if stale:
            return web.Response(status=503, text=f"no recent successful GET /app for: {', '.join(stale)}\n")
    return web.Response(text="ready\n")


async def probe_github(proxy: Proxy) -> None:
    """Each app's key is proved against GitHub once at start-up and after every reload, whatever `readiness`
    says; with readiness.checkGitHub, also every `interval`, for /readyz. It reads the settings afresh each round
    and a reload wakes it, so a new entry is checked at once. It must outlive anything GitHub answers: a prober
    that died would leave /readyz where it was for good."""
    checked = -1
    while True:
        proxy.reloaded.clear()
        try:
            if checked != proxy.generation or proxy.config.readiness.check_github:
                checked = proxy.generation
                await _probe_once(proxy)
        except Exception:
            log.exception("readiness: the GitHub check failed unexpectedly; trying again next round")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proxy.reloaded.wait(), proxy.config.readiness.interval)


async def _probe_once(proxy: Proxy) -> None:
    """One GET /app per app entry, all at once, off every request's path. A definitive refusal of the key (the
    JWT rejected: another app's key, no such app) is an error line with the fix and keeps /readyz at 503 until
    GitHub accepts it; GitHub unreachable or rate-limited is a warning that changes nothing, so that a network
    blip never takes a fleet out of service."""
    sources = proxy.app_sources
    await asyncio.gather(*(_prove_app(proxy, entry_id, source) for entry_id, source in sources.items()))


async def _prove_app(proxy: Proxy, entry_id: str, source: GitHubAppSource) -> None:
    try:
        await source.describe_app()
    except JwtRejected as error:
        if proxy.app_sources.get(entry_id) is source:
            if proxy.rejected_apps.get(entry_id) != str(error):
                log.error("entry %r: %s; /readyz answers 503 until GitHub accepts the key", entry_id, error)
            proxy.rejected_apps[entry_id] = str(error)
        return
    except ProxyError as error:
        log.warning("readiness: GitHub check for %r failed: %s (nothing changes for it)", entry_id, error)
        return
    except Exception:
        log.exception("readiness: GitHub check for %r failed unexpectedly", entry_id)
        return
    if proxy.app_sources.get(entry_id) is source:  # not replaced by a reload meanwhile
        proxy.github_ok_at[entry_id] = time.monotonic()
        if proxy.rejected_apps.pop(entry_id, None) is not None:
            log.info("entry %r: GitHub accepts the key again", entry_id)


def add_ops_routes(app: web.Application, proxy: Proxy, *, metrics: bool = True, on_git_port: bool = False) -> None:
    """On the git port, the probes and /metrics pass the same edge as git paths (see `_on_the_git_port`)."""
    probes: list[tuple[str, Handler]] = [("/healthz", healthz), ("/readyz", readyz)]
    if metrics:
        probes.append(("/metrics", make_aiohttp_handler(proxy.metrics.registry)))
    for path, handler in probes:
        app.router.add_get(path, _on_the_git_port(handler, path == "/metrics") if on_git_port else handler)


def _on_the_git_port(handler: Handler, needs_client: bool) -> Handler:
    """The git port is what a web page can reach through DNS rebinding, and what access control guards. So:
    no browser; a Host that is a loopback name, a configured name or an IP address (kubelet's probes and
    Prometheus's scrapes name the pod's IP; rebinding always names the attacker's domain); and, for /metrics with
    access control on, a client token, as git paths need. `server.metricsPort` stays a port of its own, unguarded."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        context = request.app[FORWARD_CONTEXT].current
        try:
            refuse_browsers(request.headers)
            check_host(request, context.allowed_hosts, ip_literals=True)
            if needs_client:
                await context.access.authenticate(request.headers.get("Authorization"))
        except ProxyError as error:
            status = error.status
            headers = {"WWW-Authenticate": 'Basic realm="git-token-proxy"'} if status == 401 else None
            return web.Response(status=status, text=f"{sanitise_for_client(str(error))}\n", headers=headers)
        return await handler(request)

    return guarded


def create_ops_app(proxy: Proxy) -> web.Application:
    """/metrics, /healthz and /readyz alone, for `server.metricsPort`: it stays up while git traffic drains."""
    app = web.Application()
    app[PROXY] = proxy
    add_ops_routes(app, proxy)
    return app
