"""App: wires config, router, credential sources and the shared upstream session into one aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler

from . import __version__
from .access import AccessControl
from .bodies import HeldBytes
from .config import (
    Config,
    ConfigError,
    GitHubAppEntry,
    OAuthTokenEntry,
    ServerConfig,
    auth_entries,
    with_server_settings,
)
from .credentials import CredentialSource
from .credentials.cache import TokenCache
from .credentials.keys import AppKey, load_app_key
from .credentials.shared import Sealer, SharedTokens, StoreFactory, local_stores, tiered_stores
from .credentials.static import StaticTokenSource
from .errors import ProxyError
from .forward import (
    FORWARD_CONTEXT,
    BodySlots,
    ForwardContext,
    LiveContext,
    TransferWatch,
    forward_lfs_object,
    forward_request,
)
from .forward.guards import HINTS, Hints, check_host, connect_refusal, refuse_browsers
from .lfs import LfsPolicy
from .logs import sanitise_for_client
from .metrics import Metrics
from .routing import Router, base_url_host

# What only some configs use is imported where it is built: the GitHub App client and its answer models (about 1 MiB
# of RSS) for app entries, redis-py (about 5 MiB) for cache.redis, the mirror package for mirror.dir. A proxy with
# static tokens loads none of them.
if TYPE_CHECKING:
    from .credentials.github_app import GitHubAppSource
    from .credentials.redis_store import RedisStore
    from .mirror import Mirror
    from .mirror.proof import AuthProof

log = logging.getLogger("git_token_proxy.app")


# Server-side request parsing. auto_decompress=False: git gzips upload-pack requests over 1 KiB, and upstream
# must receive those bytes with their Content-Encoding untouched; aiohttp would otherwise inflate them.
def server_handler_args(config: Config) -> dict[str, object]:
    return {
        "auto_decompress": False,
        # Limits set on purpose rather than inherited: git's request lines and headers are short.
        "max_line_size": 8190,
        "max_field_size": 8190,
        "max_headers": 100,
        # aiohttp arms this when a connection opens and again after each response, and closes a connection that
        # has not completed a request by then: the header-read timeout that stops slowloris clients.
        "keepalive_timeout": config.server.header_timeout,
    }


def build_router(config: Config) -> Router:
    """Compiles every urlPattern; a bad one raises ConfigError naming the entry (used by serve and check)."""
    return Router(config.upstreams, config.auth)


def load_app_keys(config: Config) -> dict[str, AppKey]:
    """Every app key, read and parsed once at start-up; a bad one is a ConfigError naming the entry and file."""
    keys = {}
    for entry in config.auth:
        if isinstance(entry, GitHubAppEntry):
            keys[entry.id] = load_app_key(entry.id, entry.private_key.get_secret_value())
            log.info("entry %r: app key %s", entry.id, keys[entry.id].fingerprint)
    return keys


def api_url_for(entry: GitHubAppEntry, config: Config) -> str:
    """Concord's default: api.github.com for github.com, `/api/v3` on the upstream of a GHES host."""
    if entry.api_url:
        return entry.api_url
    host = base_url_host(entry.url_pattern)
    if host == "github.com":
        return "https://api.github.com"
    upstream = next((u for u in config.upstreams if u.host == host), None)
    if upstream is None:
        # Guessing would send this app's JWT to a host nobody named; better to ask.
        raise ConfigError(
            f"auth entry {entry.id!r}: set apiUrl; the urlPattern's baseUrl does not name a configured upstream"
        )
    return f"{upstream.url}/api/v3"


@dataclass(frozen=True)
class SharedTier:
    """The fleet's shared cache (cache.redis): the store, the tokens in it, and the installation-id stores."""

    store: RedisStore
    tokens: SharedTokens
    stores: StoreFactory


# A lease outlives the longest mint (every API call is bounded by httpClientTimeout) by this much; a holder that
# died lets go after that.
LEASE_MARGIN = 5.0


def build_shared_tier(config: Config, metrics: Metrics) -> SharedTier | None:
    settings = config.cache.redis
    if settings is None:
        return None
    from .credentials.redis_store import RedisStore

    store = RedisStore(settings.url, settings.key_prefix, settings.connect_timeout, metrics, config.tls.ca_file)
    sealer = Sealer(settings.fernet_keys())
    lease_ttl = config.github.app_installation.http_client_timeout + LEASE_MARGIN
    return SharedTier(store, SharedTokens(store, sealer, lease_ttl, metrics), tiered_stores(store, sealer))


def build_token_cache(config: Config, metrics: Metrics | None = None, shared: SharedTier | None = None) -> TokenCache:
    settings = config.github.app_installation
    # One cache for all app entries: its keys carry the API URL, issuer and scope, so entries never share a token.
    return TokenCache(
        max_entries=settings.system_auth_cache_max_weight,
        max_age=settings.system_auth_cache_duration,
        refresh_before=settings.refresh_before,
        shared=shared.tokens if shared else None,
    )


def build_credential_sources(
    config: Config,
    api_session: aiohttp.ClientSession,
    keys: dict[str, AppKey],
    tokens: TokenCache,
    metrics: Metrics,
    previous: Mapping[str, CredentialSource] | None = None,
    stores: StoreFactory = local_stores,
) -> dict[str, CredentialSource]:
    """One source per entry. On a reload, a source built from exactly the same things (entry, API URL, settings,
    key: a rotated key file means a new source, even under the same path) is kept, caches and all."""
    settings = config.github.app_installation
    sources: dict[str, CredentialSource] = {}
    for entry in config.auth:
        source: CredentialSource
        if isinstance(entry, OAuthTokenEntry):
            source = StaticTokenSource(entry)
        else:
            from .credentials.github_api import GitHubAppApi
            from .credentials.github_app import GitHubAppSource

            api = GitHubAppApi(
                entry_id=entry.id, api_url=api_url_for(entry, config), issuer=entry.issuer, key=keys[entry.id],
                session=api_session, timeout=settings.http_client_timeout,
            )  # fmt: skip
            source = GitHubAppSource(entry, api, tokens, settings.system_auth_cache_max_weight, metrics, stores)
        old = (previous or {}).get(entry.id)
        sources[entry.id] = old if old is not None and old.identity == source.identity else source
    return sources


@dataclass(frozen=True)
class Credentials:
    """Where tokens come from, wired once per process: the fleet's shared tier (cache.redis), the token cache, and
    one source per auth entry."""

    shared: SharedTier | None
    tokens: TokenCache
    sources: dict[str, CredentialSource]

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.store.close()


async def build_credentials(config: Config, metrics: Metrics, api_session: aiohttp.ClientSession) -> Credentials:
    """As `create_app` builds them, for benches and tools too: no one rebuilds this wiring by hand. Raises
    ConfigError (a key, an apiUrl) with nothing left open."""
    shared = build_shared_tier(config, metrics)
    tokens = build_token_cache(config, metrics, shared)
    try:
        keys = load_app_keys(config)
        sources = build_credential_sources(config, api_session, keys, tokens, metrics, stores=_stores_of(shared))
    except ConfigError:
        if shared is not None:
            await shared.store.close()
        raise
    return Credentials(shared, tokens, sources)


def rebuild_sources(
    config: Config, api_session: aiohttp.ClientSession, credentials: Credentials, metrics: Metrics,
    previous: Mapping[str, CredentialSource],
) -> dict[str, CredentialSource]:  # fmt: skip
    """A reload's sources: keys read again, and unchanged sources kept with their caches."""
    keys = load_app_keys(config)
    stores = _stores_of(credentials.shared)
    return build_credential_sources(config, api_session, keys, credentials.tokens, metrics, previous, stores)


def build_context(
    config: Config,
    session: aiohttp.ClientSession,
    sources: dict[str, CredentialSource],
    metrics: Metrics,
    mirror: MirrorService | None = None,
) -> ForwardContext:
    """Everything that can fail (patterns, keys, apiUrl) fails here or in the sources, before anything is swapped
    in."""
    router = build_router(config)
    return ForwardContext(
        router, AccessControl(config.access.clients), sources, session, metrics,
        allowed_hosts=frozenset(host.strip().lower() for host in config.server.allowed_hosts),
        # An inspected body (an LFS batch) is part of the request: it gets the same budget as the headers.
        body_timeout=config.server.header_timeout,
        mirror=mirror.mirror if mirror else None, proof=mirror.proof if mirror else None,
        held_bodies=mirror.held_bodies if mirror else None,
        lfs=LfsPolicy.from_config(config.lfs),
    )  # fmt: skip


def body_slots(server: ServerConfig) -> int:
    """Of maxUpstreamConnections, what requests with a body still arriving may hold: a quarter (at least one
    connection) is kept for the others."""
    pool = server.max_upstream_connections
    return max(1, pool - max(1, pool // 4))


def build_ssl_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if config.tls.ca_file:
        context.load_verify_locations(cafile=str(config.tls.ca_file))
    return context


def build_api_session(config: Config) -> aiohttp.ClientSession:
    """GitHub API calls get their own connection pool: a mint must never queue behind a hundred long clones."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=build_ssl_context(config), limit=20),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),  # each call sets its own budget (httpClientTimeout)
    )


def build_upstream_session(config: Config) -> aiohttp.ClientSession:
    """One session for all git traffic, set up to pass bytes through untouched."""
    return aiohttp.ClientSession(
        # Beyond the cap, requests wait for a free connection; none is refused for want of one.
        connector=aiohttp.TCPConnector(ssl=build_ssl_context(config), limit=config.server.max_upstream_connections),
        auto_decompress=False,  # gzip packs and bodies go back to git as they came
        cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another's request
        # aiohttp would add its own User-Agent, Accept, Accept-Encoding and Content-Type: upstream must see git's.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
        # Up to twice this waits per transfer for a slower client before upstream is left unread. aiohttp's default
        # (256 KiB in 3.14, 64 KiB before) measured no less CPU than this, and 0.8 MiB more peak RSS; 64 KiB cost
        # 15 % more CPU per GiB (bench/stream.py).
        read_bufsize=128 * 1024,
    )


@dataclass(frozen=True)
class MirrorService:
    """mirror.dir: the mirrors and upstream's recent word on who may read them. Fixed at start-up."""

    mirror: Mirror
    proof: AuthProof
    held_bodies: HeldBytes  # what pack requests may hold in memory together while the mirror decides


def build_mirror(config: Config, metrics: Metrics) -> MirrorService | None:
    if config.mirror is None:
        return None
    from .mirror import Mirror
    from .mirror.proof import AuthProof

    return MirrorService(
        Mirror(config.mirror, config.tls.ca_file, metrics), AuthProof(config.mirror.auth_ttl),
        HeldBytes(config.mirror.max_held_bodies),
    )  # fmt: skip


def _stores_of(shared: SharedTier | None) -> StoreFactory:
    return shared.stores if shared is not None else local_stores


@web.middleware
async def refuse_connect(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CONNECT carries an authority, not a path, so no route sees it: refuse it here, with the fix."""
    if request.method == "CONNECT":
        return connect_refusal(request)
    return await handler(request)


@dataclass
class Proxy:
    """The long-lived parts of a running proxy. A reload swaps `live.current` and `config`; sessions, the token
    cache and the metrics stay, so in-flight requests finish and unchanged entries keep their tokens."""

    config: Config
    live: LiveContext
    session: aiohttp.ClientSession
    api_session: aiohttp.ClientSession
    credentials: Credentials  # the shared tier and the token cache are fixed at start-up; sources follow reloads
    metrics: Metrics
    mirror: MirrorService | None = None  # mirror.dir: fixed at start-up too
    bound_host: str | None = None  # the address actually listened on (serve's --host may differ from the file)
    server_overrides: dict[str, object] = field(default_factory=dict)  # --metrics-port and -host over the file's
    draining: bool = False
    stopping_since: float | None = None  # monotonic: when the drain began (serve sets it), for the grace left
    github_ok_at: dict[str, float] = field(default_factory=dict)  # entry id -> monotonic time of a good GET /app
    rejected_apps: dict[str, str] = field(default_factory=dict)  # entry id -> GitHub's definitive refusal of its key
    generation: int = 0  # counts reloads: the start-up check of every app runs again after each
    reloaded: asyncio.Event = field(default_factory=asyncio.Event)  # wakes the readiness probe

    @property
    def app_sources(self) -> dict[str, GitHubAppSource]:
        sources = self.live.current.sources
        if all(isinstance(source, StaticTokenSource) for source in sources.values()):
            return {}  # without importing the App client: /readyz asks this of every config
        from .credentials.github_app import GitHubAppSource

        return {k: s for k, s in sources.items() if isinstance(s, GitHubAppSource)}

    async def reload(self, config: Config) -> None:
        """Raises ConfigError and changes nothing when the new config cannot be built."""
        config = with_server_settings(config, self.server_overrides)  # flags win over every version of the file
        # The socket stays where it is: a new file must not drop access control from a public address.
        config.server.refuse_unsafe_bind(self.bound_host or config.server.host, has_clients=bool(config.access.clients))
        previous = self.live.current.sources
        # Keys are files, and a file can be a FIFO or huge: they are read and parsed off the event loop, so that
        # /healthz and every transfer carry on while a reload builds.
        context = await asyncio.to_thread(self._build_context, config, previous)
        self._warn_about_restart_only_changes(config)
        kept = {k for k, s in context.sources.items() if previous.get(k) is s}
        self.live.current, self.config = context, config  # the swap: one assignment each, nothing awaited between
        # A reload is the operator's way to say "try again": no rate-limit window, negative answer or backoff
        # learned from GitHub survives it, even in the sources kept with their tokens.
        for source in context.sources.values():
            source.forget_failures()
        self.credentials.tokens.forget_failures()
        for entry_id in set(self.github_ok_at) - kept:
            del self.github_ok_at[entry_id]  # a new or changed source must prove itself against GitHub again
        self.generation += 1
        self.reloaded.set()
        log.info(
            "configuration reloaded: %s (%d kept with their caches)", auth_entries(len(context.sources)), len(kept)
        )

    def _build_context(self, config: Config, previous: Mapping[str, CredentialSource]) -> ForwardContext:
        sources = rebuild_sources(config, self.api_session, self.credentials, self.metrics, previous)
        return build_context(config, self.session, sources, self.metrics, self.mirror)

    def _warn_about_restart_only_changes(self, config: Config) -> None:
        def cache_settings(c: Config) -> tuple[float, float, int]:
            s = c.github.app_installation
            return s.system_auth_cache_duration, s.refresh_before, s.system_auth_cache_max_weight

        changed = [
            key for key in ("server", "tls", "cache", "mirror") if getattr(config, key) != getattr(self.config, key)
        ]
        if cache_settings(config) != cache_settings(self.config):
            changed.append("the token cache settings (systemAuthCacheDuration, refreshBefore, MaxWeight)")
        if changed:
            log.warning("reload: changes to %s take effect only after a restart", ", ".join(changed))

    async def revoke_minted_tokens(self) -> None:
        """GitHub's advice: revoke installation tokens no longer needed. After the drain (the transfers used them),
        within what is left of shutdownGrace (at least a second), all at once. Without cache.redis only: a fleet
        shares its tokens, and one replica stopping must not revoke the others' (Config.revokes_on_shutdown)."""
        if not self.config.revokes_on_shutdown:
            return
        held: dict[str, GitHubAppSource] = {}
        for source in self.app_sources.values():
            for token in await source.held_tokens():
                held.setdefault(token, source)  # entries of one app and scope share a token: revoked once
        if not held:
            return
        grace = self.config.server.shutdown_grace
        spent = time.monotonic() - self.stopping_since if self.stopping_since is not None else 0.0
        budget = max(1.0, grace - spent)
        results = await asyncio.gather(*(source.revoke_token(token, budget) for token, source in held.items()))
        revoked = sum(results)
        log.info("revoked %d of %d installation tokens on shutdown (revokeOnShutdown)", revoked, len(results))

    async def close(self) -> None:
        await self.session.close()
        await self.api_session.close()
        await self.credentials.close()
        if self.mirror is not None:
            await self.mirror.mirror.close()


PROXY = web.AppKey("proxy", Proxy)


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


async def _probe_github(proxy: Proxy) -> None:
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
    from .errors import JwtRejected

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
                context.access.authenticate(request.headers.get("Authorization"))
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


async def create_app(config: Config) -> web.Application:
    """Build the proxy. Must run inside the event loop that will serve it (the sessions bind to it)."""
    metrics = Metrics()
    session, api_session = build_upstream_session(config), build_api_session(config)
    try:
        credentials = await build_credentials(config, metrics, api_session)
        context = build_context(config, session, credentials.sources, metrics, mirror := build_mirror(config, metrics))
    except ConfigError:
        await session.close()
        await api_session.close()
        raise
    metrics.watch_token_expiry(credentials.tokens.seconds_until_soonest_expiry)
    transfers = TransferWatch(config.server.write_timeout, metrics, config.server.min_body_rate)
    slots = body_slots(config.server)
    live = LiveContext(context, transfers, body_slots=BodySlots(slots))
    proxy = Proxy(config, live, session, api_session, credentials, metrics, mirror)
    app = web.Application(handler_args=server_handler_args(config), middlewares=[refuse_connect])
    app[PROXY] = proxy
    app[FORWARD_CONTEXT] = proxy.live
    app[HINTS] = Hints()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        background = [asyncio.create_task(_probe_github(proxy)), asyncio.create_task(transfers.run())]
        if mirror is not None:
            background.append(asyncio.create_task(mirror.mirror.run_maintenance()))
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        try:
            await proxy.revoke_minted_tokens()
        except Exception:  # shutdown goes on whatever GitHub answers
            log.exception("revoking tokens on shutdown failed")
        await proxy.close()

    app.cleanup_ctx.append(lifecycle)
    # With server.metricsPort, the probes stay on the git port too: liveness where Docker's HEALTHCHECK looks, and
    # "draining" there until the listener closes.
    add_ops_routes(app, proxy, metrics=config.server.metrics_port is None, on_git_port=True)
    # Handles the proxy itself gave out in LFS batch answers; `/_lfs` can never be an upstream host's path.
    app.router.add_route("*", "/_lfs/{handle}", forward_lfs_object)
    app.router.add_route("*", "/{path:.*}", forward_request)
    log.debug(
        "git-token-proxy %s: %d upstream(s), %s", __version__, len(config.upstreams), auth_entries(len(config.auth))
    )
    return app
