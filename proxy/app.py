"""App: wires config, router, credential sources and the shared upstream session into one aiohttp application."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from . import __version__
from .access import AccessControl
from .config import Config, ConfigError, GitHubAppEntry, OAuthTokenEntry
from .credentials import CredentialSource
from .credentials.cache import TokenCache
from .credentials.github_api import GitHubAppApi
from .credentials.github_app import GitHubAppSource
from .credentials.keys import AppKey, load_app_key
from .credentials.static import StaticTokenSource
from .forward import FORWARD_CONTEXT, ForwardContext, forward_request
from .routing import Router, base_url_host

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


def build_credential_sources(
    config: Config, api_session: aiohttp.ClientSession, keys: dict[str, AppKey]
) -> dict[str, CredentialSource]:
    settings = config.github.app_installation
    # One cache for all app entries: its keys carry the API URL and issuer, so entries never share a token.
    tokens = TokenCache(
        max_entries=settings.system_auth_cache_max_weight,
        max_age=settings.system_auth_cache_duration,
        refresh_before=settings.refresh_before,
    )
    sources: dict[str, CredentialSource] = {}
    for entry in config.auth:
        if isinstance(entry, OAuthTokenEntry):
            sources[entry.id] = StaticTokenSource(entry)
        else:
            api = GitHubAppApi(
                entry_id=entry.id, api_url=api_url_for(entry, config), issuer=entry.issuer, key=keys[entry.id],
                session=api_session, timeout=settings.http_client_timeout,
            )  # fmt: skip
            sources[entry.id] = GitHubAppSource(entry, api, tokens, settings.system_auth_cache_max_weight)
    return sources


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
    )


@web.middleware
async def refuse_connect(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CONNECT carries an authority, not a path, so no route sees it: refuse it here, plainly."""
    if request.method == "CONNECT":
        return web.Response(status=405, text="CONNECT is not supported: this is not a forward proxy\n")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def create_app(config: Config) -> web.Application:
    """Build the proxy. Must run inside the event loop that will serve it (the upstream session binds to it)."""
    router = build_router(config)
    keys = load_app_keys(config)
    app = web.Application(handler_args=server_handler_args(config), middlewares=[refuse_connect])
    session = build_upstream_session(config)
    api_session = build_api_session(config)
    try:
        sources = build_credential_sources(config, api_session, keys)
    except ConfigError:
        await session.close()
        await api_session.close()
        raise
    app[FORWARD_CONTEXT] = ForwardContext(router, AccessControl(config.access.clients), sources, session)

    async def close_upstream(app: web.Application) -> AsyncIterator[None]:
        yield
        for source in sources.values():
            await source.close()
        await session.close()
        await api_session.close()

    app.cleanup_ctx.append(close_upstream)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{path:.*}", forward_request)
    log.debug("git-token-proxy %s: %d upstreams, %d auth entries", __version__, len(config.upstreams), len(sources))
    return app
