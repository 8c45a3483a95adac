"""Running: the long-lived parts of a running proxy, and what a reload, a drain and a shutdown do to them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .config import Config, auth_entries, with_server_settings
from .credentials import CredentialSource
from .credentials.static import StaticTokenSource
from .forward import ForwardContext, LiveContext
from .metrics import Metrics

if TYPE_CHECKING:
    from .access.identities import IdentityVerifier
    from .access.verifiers import KeyRegistries
    from .bodies import HeldBytes
    from .credentials.cache import TokenCache
    from .credentials.github_app import GitHubAppSource
    from .credentials.redis_store import RedisStore
    from .credentials.shared import SharedTokens, StoreFactory
    from .mirror import Mirror
    from .mirror.proof import AuthProof

log = logging.getLogger("git_token_proxy.app")


@dataclass(frozen=True)
class SharedTier:
    """The fleet's shared cache (cache.redis): the store, the tokens in it, and the installation-id stores."""

    store: RedisStore
    tokens: SharedTokens
    stores: StoreFactory


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


@dataclass(frozen=True)
class MirrorService:
    """mirror.dir: the mirrors and upstream's recent word on who may read them. Fixed at start-up."""

    mirror: Mirror
    proof: AuthProof
    held_bodies: HeldBytes  # what pack requests may hold in memory together while the mirror decides


# A reload's new context, from the new config, the sources of now (unchanged ones are kept with their caches) and
# the new config's identity verifier.
BuildContext = Callable[[Config, Mapping[str, CredentialSource], "IdentityVerifier | None"], ForwardContext]


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
    rebuild: BuildContext  # what a reload runs (off the event loop) to build its context
    identities: KeyRegistries  # access.issuers: the keys of every issuer, kept across reloads
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
        config.server.refuse_unsafe_bind(self.bound_host or config.server.host, has_clients=config.access.enabled)
        previous = self.live.current.sources
        # Keys are files, and a file can be a FIFO or huge: they are read and parsed off the event loop, so that
        # /healthz and every transfer carry on while a reload builds.
        try:
            verifier = self.identities.verifier_for(config)  # in the loop: a new issuer's keys start fetching
            context = await asyncio.to_thread(self.rebuild, config, previous, verifier)
        except BaseException:
            # The running config stays, and so do only its issuers' keys: a new issuer's fetching stops with it.
            await self.identities.retain(self.live.current.access.identities)
            raise
        self._warn_about_restart_only_changes(config)
        kept = {k for k, s in context.sources.items() if previous.get(k) is s}
        self.live.current, self.config = context, config  # the swap: one assignment each, nothing awaited between
        await self.identities.retain(verifier)
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
        await self.identities.close()
        if self.mirror is not None:
            await self.mirror.mirror.close()


PROXY = web.AppKey("proxy", Proxy)
