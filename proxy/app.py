"""App: wires config, router, credential sources and the shared upstream session into one aiohttp application;
the `build_*` functions are that wiring, for `serve`, `check`, benches and tools alike."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from . import __version__
from .access import AccessControl
from .access.verifiers import KeyRegistries
from .bodies import HeldBytes
from .config import (
    AuthEntry,
    Config,
    ConfigError,
    GitHubAppEntry,
    OAuthTokenEntry,
    ServerConfig,
    auth_entries,
)
from .credentials import CredentialSource
from .credentials.cache import TokenCache
from .credentials.keys import AppKey, load_app_key
from .credentials.shared import Sealer, SharedTokens, StoreFactory, local_stores, tiered_stores
from .credentials.static import StaticTokenSource
from .forward import (
    FORWARD_CONTEXT,
    BodySlots,
    ForwardContext,
    LiveContext,
    TransferWatch,
    forward_lfs_object,
    forward_request,
)
from .forward.context import PushSettings
from .forward.guards import HINTS, Hints, connect_refusal
from .health import add_ops_routes, probe_github
from .lfs import LfsPolicy
from .metrics import Metrics
from .routing import Router, base_url_host
from .running import PROXY, Credentials, MirrorService, Proxy, SharedTier

# What only some configs use is imported where it is built: the GitHub App client and its answer models (about 1 MiB
# of RSS) for app entries, redis-py (about 5 MiB) for cache.redis, the mirror package for mirror.dir. A proxy with
# static tokens loads none of them.
if TYPE_CHECKING:
    from .access.identities import IdentityVerifier

    pass

log = logging.getLogger("git_token_proxy.app")


# Room for a signed identity (access/identities.MAX_TOKEN_CHARS, 8 KiB) as a Basic password, base64-encoded with a
# username, and for one up to about 12 KiB, so that git shows the proxy's own reason for refusing it rather than the
# parser's (which quotes a header's first 100 bytes). Bounded all the same: 32 headers of it per request.
MAX_HEADER_FIELD = 16 * 1024


# Server-side request parsing. auto_decompress=False: git gzips upload-pack requests over 1 KiB, and upstream
# must receive those bytes with their Content-Encoding untouched; aiohttp would otherwise inflate them.
def server_handler_args(config: Config) -> dict[str, object]:
    return {
        "auto_decompress": False,
        # Limits set on purpose rather than inherited: git's request lines and headers are short.
        "max_line_size": 8190,
        "max_field_size": MAX_HEADER_FIELD,
        # git sends about 12 headers and an ingress adds a few: 32 at most keeps a request's headers under 512 KiB
        # with MAX_HEADER_FIELD, below what 100 of 8 KiB allowed (500 idle clients sending 100 took 1.6 GB).
        "max_headers": 32,
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
    url = host_api_url(entry, config)
    if url is None:
        # Guessing would send this app's JWT to a host nobody named; better to ask.
        raise ConfigError(
            f"auth entry {entry.id!r}: set apiUrl; the urlPattern's baseUrl does not name a configured upstream"
        )
    return url


def host_api_url(entry: AuthEntry, config: Config) -> str | None:
    """The REST API of the host an entry's urlPattern names, or None when it names no configured upstream."""
    host = base_url_host(entry.url_pattern)
    if host == "github.com":
        return "https://api.github.com"
    upstream = next((u for u in config.upstreams if u.host == host), None)
    return f"{upstream.url}/api/v3" if upstream is not None else None


def build_push_settings(config: Config, api_session: aiohttp.ClientSession) -> PushSettings | None:
    """With a push policy on an entry or a client: the entries' policies, compiled once, and where each entry's
    fast-forward questions go (an app's API, or the host's for a static token; none: such updates are refused
    as undecidable)."""
    entries = [entry for entry in config.auth if entry.push is not None]
    # An issuer's tokens may bring a policy in their scope claim, whatever the issuer itself says.
    clients_push = any(client.push is not None for client in config.access.clients) or config.access.issuers
    if not entries and not clients_push:
        return None
    from .push.budget import CompareBudget
    from .push.rules import PushPolicy

    policies = {e.id: PushPolicy.from_config(f"auth entry {e.id!r}", e.push) for e in entries if e.push is not None}
    api_urls = {}
    for entry in config.auth:
        url = api_url_for(entry, config) if isinstance(entry, GitHubAppEntry) else host_api_url(entry, config)
        if url is not None:
            api_urls[entry.id] = url
    return PushSettings(policies, api_session, api_urls, CompareBudget())


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
    sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession],
    sources: dict[str, CredentialSource],
    metrics: Metrics,
    mirror: MirrorService | None = None,
    identities: IdentityVerifier | None = None,
) -> ForwardContext:
    """Everything that can fail (patterns, keys, apiUrl) fails here or in the sources, before anything is swapped
    in."""
    router = build_router(config)
    session, api_session = sessions  # git's, and the API's
    return ForwardContext(
        router, AccessControl(config.access.clients, identities), sources, session, metrics,
        allowed_hosts=frozenset(host.strip().lower() for host in config.server.allowed_hosts),
        # An inspected body (an LFS batch) is part of the request: it gets the same budget as the headers.
        body_timeout=config.server.header_timeout,
        mirror=mirror.mirror if mirror else None, proof=mirror.proof if mirror else None,
        held_bodies=mirror.held_bodies if mirror else None,
        lfs=LfsPolicy.from_config(config.lfs), push=build_push_settings(config, api_session),
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


def build_mirror(config: Config, metrics: Metrics, shared: SharedTier | None = None) -> MirrorService | None:
    if config.mirror is None:
        return None
    if config.mirror.snapshots is not None and importlib.util.find_spec("aiobotocore") is None:
        raise ConfigError(
            "mirror.snapshots needs the S3 client, which is an extra: pip install 'git-token-proxy[snapshots]' "
            "(the Docker image's mirror target has it)"
        )
    from .mirror import Mirror
    from .mirror.proof import AuthProof

    return MirrorService(
        # With cache.redis, its lease makes one replica of the fleet publish each repo's snapshot.
        Mirror(config.mirror, config.tls.ca_file, metrics, shared.store if shared else None),
        AuthProof(config.mirror.auth_ttl),
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


async def create_app(config: Config) -> web.Application:
    """Build the proxy. Must run inside the event loop that will serve it (the sessions bind to it)."""
    metrics = Metrics()
    session, api_session = build_upstream_session(config), build_api_session(config)
    try:
        credentials = await build_credentials(config, metrics, api_session)
        mirror = build_mirror(config, metrics)
        registry = KeyRegistries(api_session)
        identities = registry.verifier_for(config)
        context = build_context(config, (session, api_session), credentials.sources, metrics, mirror, identities)
    except ConfigError:
        await session.close()
        await api_session.close()
        raise
    metrics.watch_token_expiry(credentials.tokens.seconds_until_soonest_expiry)
    server = config.server
    transfers = TransferWatch(server.write_timeout, metrics, server.min_body_rate, server.min_answer_rate)
    slots = body_slots(config.server)
    live = LiveContext(context, transfers, body_slots=BodySlots(slots))

    def rebuild_context(
        new: Config, previous: Mapping[str, CredentialSource], identities: IdentityVerifier | None
    ) -> ForwardContext:
        sources = rebuild_sources(new, api_session, credentials, metrics, previous)
        return build_context(new, (session, api_session), sources, metrics, mirror, identities)

    proxy = Proxy(config, live, session, api_session, credentials, metrics, rebuild_context, registry, mirror)
    app = web.Application(handler_args=server_handler_args(config), middlewares=[refuse_connect])
    app[PROXY] = proxy
    app[FORWARD_CONTEXT] = proxy.live
    app[HINTS] = Hints()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        background = [asyncio.create_task(probe_github(proxy)), asyncio.create_task(transfers.run())]
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
