"""App: wires config, router, credential sources and the shared upstream session into one aiohttp application."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import __version__
from .config import Config, OAuthTokenEntry
from .credentials import CredentialSource
from .credentials.static import StaticTokenSource
from .forward import FORWARD_CONTEXT, ForwardContext, forward_request
from .routing import Router

log = logging.getLogger("git_token_proxy.app")

# Server-side request parsing. auto_decompress=False: git gzips upload-pack requests over 1 KiB, and upstream
# must receive those bytes with their Content-Encoding untouched; aiohttp would otherwise inflate them.
SERVER_HANDLER_ARGS = {"auto_decompress": False, "max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}


def build_router(config: Config) -> Router:
    """Compiles every urlPattern; a bad one raises ConfigError naming the entry (used by serve and check)."""
    return Router(config.upstreams, config.auth)


def build_credential_sources(config: Config, session: aiohttp.ClientSession) -> dict[str, CredentialSource]:
    sources: dict[str, CredentialSource] = {}
    for entry in config.auth:
        if isinstance(entry, OAuthTokenEntry):
            sources[entry.id] = StaticTokenSource(entry)
    return sources


def build_ssl_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if config.tls.ca_file:
        context.load_verify_locations(cafile=str(config.tls.ca_file))
    return context


def build_upstream_session(config: Config) -> aiohttp.ClientSession:
    """One session for all upstream traffic, git and API alike, set up to pass bytes through untouched."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=build_ssl_context(config)),
        auto_decompress=False,  # gzip packs and bodies go back to git as they came
        cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another's request
        # aiohttp would add its own User-Agent, Accept, Accept-Encoding and Content-Type: upstream must see git's.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def create_app(config: Config) -> web.Application:
    """Build the proxy. Must run inside the event loop that will serve it (the upstream session binds to it)."""
    router = build_router(config)
    app = web.Application(handler_args=SERVER_HANDLER_ARGS)
    session = build_upstream_session(config)
    sources = build_credential_sources(config, session)
    app[FORWARD_CONTEXT] = ForwardContext(router, sources, session)

    async def close_upstream(app: web.Application) -> AsyncIterator[None]:
        yield
        for source in sources.values():
            await source.close()
        await session.close()

    app.cleanup_ctx.append(close_upstream)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{path:.*}", forward_request)
    log.debug("git-token-proxy %s: %d upstreams, %d auth entries", __version__, len(config.upstreams), len(sources))
    return app
