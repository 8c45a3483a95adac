"""Check: validate a config the way `serve` would, then prove each app key against GitHub, without printing a secret."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from .app import build_api_session, build_credential_sources, build_router, build_token_cache, load_app_keys
from .config import Config, ConfigError
from .credentials import CredentialSource
from .credentials.github_app import GitHubAppSource
from .credentials.redis_store import RedisStore
from .credentials.shared import Sealer
from .errors import ProxyError
from .metrics import Metrics
from .routing import RepoRef, Router, base_url_host


async def run_check(config: Config, source_name: str, repo: str | None) -> int:
    """0 when everything holds; 1 when GitHub refused something. Config errors raise ConfigError (exit 2)."""
    router = build_router(config)
    keys = load_app_keys(config)
    _print_entries(config)
    failures = await _check_shared_cache(config)
    async with build_api_session(config) as session:
        sources = build_credential_sources(config, session, keys, build_token_cache(config), Metrics())
        for entry_id, source in sources.items():
            if isinstance(source, GitHubAppSource):
                failures += await _check_app(entry_id, source, keys[entry_id].fingerprint)
        if repo:
            failures += await _check_repo(repo, router, sources)
    print(f"{source_name}: {'OK' if not failures else f'{failures} problem(s)'}, {len(config.auth)} auth entries")
    return 1 if failures else 0


async def _check_shared_cache(config: Config) -> int:
    """cache.redis: connect, round-trip an encrypted probe value, and say what happened (never the password)."""
    settings = config.cache.redis
    if settings is None:
        return 0
    store = RedisStore(settings.url, settings.key_prefix, settings.connect_timeout, Metrics(), config.tls.ca_file)
    where = store.where
    sealer = Sealer(settings.fernet_keys())
    probe = secrets.token_hex(8)
    try:
        await store.ping()
        await store.put(f"check:{probe}", sealer.seal({"probe": probe}), 30)
        stored = await store.get(f"check:{probe}")
        await store.delete(f"check:{probe}")
        opened = sealer.open(stored) if stored is not None else None
        if opened != {"probe": probe}:
            raise OSError("the probe value did not come back (a read-only replica, or eviction?)")
    except Exception as error:  # whatever redis-py raises: the reason is the output
        print(f"shared cache: Redis at {where}: FAILED: {type(error).__name__}: {str(error)[:200]}\n")
        return 1
    finally:
        await store.close()
    print(f"shared cache: Redis at {where}: OK (an encrypted probe value went there and back)\n")
    return 0


def _print_entries(config: Config) -> None:
    rows = [("ID", "TYPE", "URL PATTERN", "UPSTREAM")]
    listed = {upstream.host for upstream in config.upstreams}
    for entry in config.auth:
        host = base_url_host(entry.url_pattern)
        upstream = host if host in listed else f"(none: {host or '?'} is not in upstreams)"
        rows.append((entry.id, entry.type, entry.url_pattern, upstream))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    hosts = ", ".join(f"{u.host} -> {u.url}{'' if u.anonymous else ' (no anonymous)'}" for u in config.upstreams)
    print(f"upstreams: {hosts}\n")


async def _check_app(entry_id: str, source: GitHubAppSource, fingerprint: str) -> int:
    try:
        app = await source.describe_app()
    except ProxyError as error:
        print(f"{entry_id}: key {fingerprint}: FAILED: {error}")
        return 1
    print(f"{entry_id}: key {fingerprint}: GitHub App {app.get('slug')!r} (id {app.get('id')})")
    return 0


async def _check_repo(repo: str, router: Router, sources: Mapping[str, CredentialSource]) -> int:
    host, _, path = repo.removeprefix("https://").removeprefix("http://").partition("/")
    if host.lower() not in router.upstream_hosts:
        raise ConfigError(f"--repo {repo}: host {host!r} is not in upstreams")
    entry, ref = router.match_entry(host.lower(), path.strip("/").split("/"))
    if entry is None:
        print(f"{ref}: no auth entry matches; forwarded without credentials")
        return 0
    source = sources[entry.id]
    if not isinstance(source, GitHubAppSource):
        print(f"{ref}: entry {entry.id!r} ({entry.type}): a static token")
        return 0
    return await _mint_for(ref, entry.id, source)


async def _mint_for(ref: RepoRef, entry_id: str, source: GitHubAppSource) -> int:
    try:
        installation_id = await source.installation_for(ref)
        await source.get_credential(ref)
        token = await source.peek_token(ref)
    except ProxyError as error:
        print(f"{ref}: entry {entry_id!r}: FAILED: {error}")
        return 1
    assert token is not None
    permissions = ", ".join(f"{name}:{level}" for name, level in sorted(token.permissions.items()))
    print(f"{ref}: entry {entry_id!r}, installation {installation_id}: minted a token (not shown)")
    print(f"  expires {token.expires_at_wall}; permissions {permissions or '(none reported)'}")
    return 0
