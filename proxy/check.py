"""Check: validate a config the way `serve` would, then prove each credential against GitHub, without printing a
secret. Whatever cannot work (an entry that never matches, one shadowed by an earlier catch-all, a token upstream
rejects, an empty config) fails the check, so it can gate a deploy."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import re2

from .app import build_api_session, build_credential_sources, build_router, build_token_cache, load_app_keys
from .config import Config, ConfigError, GitHubAppEntry, OAuthTokenEntry, UpstreamConfig, auth_entries
from .credentials import CredentialSource
from .credentials.github_app import GitHubAppSource
from .credentials.redis_store import RedisStore
from .credentials.shared import Sealer
from .errors import ProxyError
from .metrics import Metrics
from .routing import RepoRef, Router, base_url_host, compile_linear, compile_url_pattern

OK, FAILED, WARNING = "OK", "FAILED", "WARNING"
# Owners and repos no real pattern names: an entry that matches them on a host matches every repo there.
_PROBES = ("zz-probe-owner-7q/zz-probe-repo-7q", "another-probe-9x/repo.git")
_CHECK_TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Report:
    """One row per thing checked: what, the result, and a detail that never holds a secret."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, what: str, result: str, detail: str) -> int:
        """Adds a row; 1 for a failure, so callers can count them."""
        self.rows.append((what, result, detail))
        return 1 if result == FAILED else 0

    @property
    def failures(self) -> int:
        return sum(1 for _, result, _ in self.rows if result == FAILED)

    def print_table(self) -> None:
        rows = [("CHECK", "RESULT", "DETAIL"), *self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        print()
        for what, result, detail in rows:
            print(f"{what.ljust(widths[0])}  {result.ljust(widths[1])}  {detail}")


async def run_check(config: Config, source_name: str, repo: str | None, allow_empty: bool = False) -> int:
    """0 when everything holds; 1 when something cannot work. Config errors raise ConfigError (exit 2)."""
    router = build_router(config)
    keys = load_app_keys(config)
    report = Report()
    _print_entries(config)
    _check_entries(config, report, allow_empty)
    _show_push_policies(config, report)
    await _check_shared_cache(config, report)
    async with build_api_session(config) as session:
        sources = build_credential_sources(config, session, keys, build_token_cache(config), Metrics())
        for entry_id, source in sources.items():
            if isinstance(source, GitHubAppSource):
                await _check_app(entry_id, source, keys[entry_id].fingerprint, report)
        for entry in config.auth:
            if isinstance(entry, OAuthTokenEntry):
                await _check_static_token(entry, config, router, session, repo, report)
        if repo:
            await _check_repo(repo, router, sources, session, report)
    report.print_table()
    failures = report.failures
    print(f"{source_name}: {'OK' if not failures else f'{failures} problem(s)'}, {auth_entries(len(config.auth))}")
    return 1 if failures else 0


# ------------------------------------------------------------ entries that can never work


def _check_entries(config: Config, report: Report, allow_empty: bool) -> None:
    hosts = [upstream.host for upstream in config.upstreams]
    if not config.auth:
        result = WARNING if allow_empty else FAILED
        report.add("auth entries", result, "none: every repo goes without credentials (--allow-empty: on purpose)")
        return
    reach = {entry.id: reachable_hosts(entry.url_pattern, hosts) for entry in config.auth}
    for index, entry in enumerate(config.auth):
        if not reach[entry.id]:
            report.add(f"entry {entry.id}", FAILED, _never_matches(entry.url_pattern, hosts))
            continue
        shadow = _shadowing_entry(config.auth[:index], reach[entry.id])
        if shadow is not None:
            earlier, host = shadow
            report.add(
                f"entry {entry.id}", FAILED,
                f"never used: {earlier!r} comes first and matches every repo on {host} (the first match wins); "
                f"move {entry.id!r} above it",
            )  # fmt: skip
        else:
            report.add(f"entry {entry.id}", OK, f"matches repos on {', '.join(reach[entry.id])}")


def _show_push_policies(config: Config, report: Report) -> None:
    """Each entry's and client's effective push policy, as a request is checked against it ({client} is filled in
    with the client's name; an entry's and a client's must both allow a ref update)."""
    from .push.rules import describe

    for entry in config.auth:
        if entry.push is not None:
            report.add(f"push {entry.id}", OK, describe(entry.push))
    for client in config.access.clients:
        if client.push is not None:
            shown = describe(client.push).replace("{client}", client.name)
            report.add(f"push client {client.name}", OK, shown)


def base_url_group(pattern: str) -> str | None:
    """The text inside `(?<baseUrl>...)` (or `(?P<baseUrl>...)`), found by balancing parentheses."""
    for opener in ("(?<baseUrl>", "(?P<baseUrl>"):
        start = pattern.find(opener)
        if start >= 0:
            return _until_closing(pattern, start + len(opener))
    return None


def _unescaped(text: str, start: int = 0, depth: int = 0) -> Iterator[tuple[int, str, int]]:
    """Each character of a pattern from `start` that no backslash escapes, with the parenthesis depth after it."""
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        yield index, char, depth
        index += 1


def _until_closing(pattern: str, start: int) -> str | None:
    return next((pattern[start:index] for index, _, depth in _unescaped(pattern, start, depth=1) if depth == 0), None)


def _host_part(group: str) -> str:
    """The baseUrl's host: what comes before its first unescaped `/` outside parentheses."""
    return next((group[:index] for index, char, depth in _unescaped(group) if char == "/" and depth == 0), group)


def reachable_hosts(pattern: str, hosts: Sequence[str]) -> list[str]:
    """The upstream hosts a pattern's baseUrl can name. Routing only looks at hosts in `upstreams`, so an entry
    whose baseUrl names no such host can never match a request."""
    group = base_url_group(pattern)
    if group is not None:
        try:
            host_pattern = compile_linear(f"(?:{_host_part(group)})")
        except re2.error:
            pass  # a baseUrl the split above cut badly: fall back to the plain reading
        else:
            return [host for host in hosts if host_pattern.fullmatch(host)]
    plain = base_url_host(pattern)
    return [plain] if plain is not None and plain in hosts else []


def _never_matches(pattern: str, hosts: Sequence[str]) -> str:
    group = base_url_group(pattern) or ""
    named = base_url_host(pattern) or _host_part(group).replace("\\.", ".") or pattern
    why = f"can never match: its baseUrl names {named!r}, which is not in upstreams ({', '.join(hosts) or 'none'})"
    if "://" in group:
        return why + "; patterns see host/owner/repo without a scheme: drop the 'https://'"
    return why + "; add that host to upstreams, or fix urlPattern"


def _shadowing_entry(
    earlier: Sequence[OAuthTokenEntry | GitHubAppEntry], hosts: Sequence[str]
) -> tuple[str, str] | None:
    """An earlier entry that matches every repo on a host this one reaches: this one never gets a request."""
    for entry in earlier:
        pattern = compile_url_pattern(entry.id, entry.url_pattern)
        for host in hosts:
            if all(pattern.fullmatch(f"{host}/{probe}") for probe in _PROBES):
                return entry.id, host
    return None


def _print_entries(config: Config) -> None:
    rows = [("ID", "TYPE", "URL PATTERN", "UPSTREAM")]
    hosts = [upstream.host for upstream in config.upstreams]
    for entry in config.auth:
        reached = reachable_hosts(entry.url_pattern, hosts)
        group = base_url_group(entry.url_pattern) or ""
        named = base_url_host(entry.url_pattern) or _host_part(group).replace("\\.", ".")
        upstream = ", ".join(reached) if reached else f"(none: {named!r} is not in upstreams)"
        rows.append((entry.id, entry.type, entry.url_pattern, upstream))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    listed = ", ".join(f"{u.host} -> {u.url}{'' if u.anonymous else ' (no anonymous)'}" for u in config.upstreams)
    print(f"upstreams: {listed}\n")


# ------------------------------------------------------------ credentials


async def _check_shared_cache(config: Config, report: Report) -> None:
    """cache.redis: connect, round-trip an encrypted probe value, and say what happened (never the password)."""
    settings = config.cache.redis
    if settings is None:
        return
    store = RedisStore(settings.url, settings.key_prefix, settings.connect_timeout, Metrics(), config.tls.ca_file)
    where = store.where
    sealer = Sealer(settings.fernet_keys())
    probe = secrets.token_hex(8)
    try:
        await store.ping()
        await store.put(f"check:{probe}", sealer.seal({"probe": probe}, f"check:{probe}"), 30)
        stored = await store.get(f"check:{probe}")
        await store.delete(f"check:{probe}")
        opened = sealer.open(stored, f"check:{probe}") if stored is not None else None
        if opened != {"probe": probe}:
            raise OSError("the probe value did not come back (a read-only replica, or eviction?)")
    except Exception as error:  # whatever redis-py raises: the reason is the output
        print(f"shared cache: Redis at {where}: FAILED: {type(error).__name__}: {str(error)[:200]}\n")
        report.add("shared cache", FAILED, f"Redis at {where}: {type(error).__name__}")
        return
    finally:
        await store.close()
    print(f"shared cache: Redis at {where}: OK (an encrypted probe value went there and back)\n")
    report.add("shared cache", OK, f"Redis at {where}")


async def _check_app(entry_id: str, source: GitHubAppSource, fingerprint: str, report: Report) -> None:
    try:
        app = await source.describe_app()
    except ProxyError as error:
        print(f"{entry_id}: key {fingerprint}: FAILED: {error}")
        report.add(f"app {entry_id}", FAILED, str(error))
        return
    named = app.get("slug") or app.get("name") or f"id {app.get('id')}"  # GitHub need not send a slug
    print(f"{entry_id}: key {fingerprint}: GitHub App {named!r} (id {app.get('id')})")
    report.add(f"app {entry_id}", OK, f"key {fingerprint} signs for GitHub App {named!r}")
    entry = source.entry
    if entry.client_id and entry.app_id is not None:
        _check_issuer_pair(entry, app, report)


def _check_issuer_pair(entry: GitHubAppEntry, app: Mapping[str, object], report: Report) -> None:
    """With both clientId and appId, the JWT is signed with clientId: appId must name the same app."""
    what = f"app {entry.id}: appId"
    if app.get("id") != entry.app_id:
        report.add(
            what, FAILED,
            f"appId {entry.app_id} is not the app of clientId {entry.client_id!r} (id {app.get('id')}); "
            "clientId is the one used: fix appId or drop it",
        )  # fmt: skip
    else:
        report.add(what, OK, f"clientId is used; appId {entry.app_id} names the same app")


def _api_url_of(upstream: UpstreamConfig) -> str:
    return "https://api.github.com" if upstream.url == "https://github.com" else f"{upstream.url}/api/v3"


async def _check_static_token(
    entry: OAuthTokenEntry, config: Config, router: Router, session: aiohttp.ClientSession, repo: str | None,
    report: Report,
) -> None:  # fmt: skip
    """A static token is asked about with itself: GET /rate_limit (free of quota) where the upstream is GitHub.
    Elsewhere (GHES without rate limits, other git servers), an authenticated info/refs of --repo answers."""
    what = f"token {entry.id}"
    reached = reachable_hosts(entry.url_pattern, [u.host for u in config.upstreams])
    upstream = next((u for u in config.upstreams if u.host in reached), None)
    if upstream is None:
        return  # never matches: already a failure of its own
    token = entry.token.get_secret_value()
    status = await _status_of(session, f"{_api_url_of(upstream)}/rate_limit", f"token {token}")
    if status == 200:
        report.add(what, OK, f"{upstream.host} accepts it (GET /rate_limit)")
    elif status == 401:
        report.add(what, FAILED, f"{upstream.host} rejects it (401 on GET /rate_limit): revoked, expired or mistyped")
    elif repo is None:
        report.add(what, WARNING, f"not verified (GET /rate_limit: {status}); give --repo to try an info/refs")


async def _status_of(session: aiohttp.ClientSession, url: str, authorization: str) -> int | str:
    try:
        async with session.get(url, headers={"Authorization": authorization}, timeout=_CHECK_TIMEOUT) as response:
            return response.status
    except (TimeoutError, aiohttp.ClientError) as error:
        return type(error).__name__


async def _check_repo(
    repo: str, router: Router, sources: Mapping[str, CredentialSource], session: aiohttp.ClientSession,
    report: Report,
) -> None:  # fmt: skip
    host, _, path = repo.removeprefix("https://").removeprefix("http://").partition("/")
    if host.lower() not in router.upstream_hosts:
        raise ConfigError(f"--repo {repo}: host {host!r} is not in upstreams")
    entry, ref = router.match_entry(host.lower(), path.strip("/").split("/"))
    if entry is None:
        print(f"{ref}: no auth entry matches; forwarded without credentials")
        report.add(f"repo {ref}", WARNING, "no auth entry matches: forwarded without credentials")
        return
    source = sources[entry.id]
    if isinstance(source, GitHubAppSource):
        await _mint_for(ref, entry.id, source, report)
    elif isinstance(entry, OAuthTokenEntry):
        print(f"{ref}: entry {entry.id!r} ({entry.type}): a static token")
        await _fetch_refs(ref, entry, router, session, report)


async def _fetch_refs(
    ref: RepoRef, entry: OAuthTokenEntry, router: Router, session: aiohttp.ClientSession, report: Report
) -> None:
    """One authenticated info/refs, as git's first request would be."""
    route = router.resolve_route("GET", f"/{ref.host}/{ref.full_name}/info/refs", "service=git-upload-pack")
    basic = base64.b64encode(f"{entry.username}:{entry.token.get_secret_value()}".encode()).decode()
    status = await _status_of(session, route.url, f"Basic {basic}")
    if status == 200:
        report.add(f"repo {ref}", OK, f"entry {entry.id!r}: info/refs answered 200 with the token")
    else:
        report.add(f"repo {ref}", FAILED, f"entry {entry.id!r}: info/refs answered {status} with the token")


async def _mint_for(ref: RepoRef, entry_id: str, source: GitHubAppSource, report: Report) -> None:
    try:
        installation_id = await source.installation_for(ref)
        await source.get_credential(ref)
        token = await source.peek_token(ref)
    except ProxyError as error:
        print(f"{ref}: entry {entry_id!r}: FAILED: {error}")
        report.add(f"repo {ref}", FAILED, str(error))
        return
    assert token is not None
    permissions = ", ".join(f"{name}:{level}" for name, level in sorted(token.permissions.items()))
    print(f"{ref}: entry {entry_id!r}, installation {installation_id}: minted a token (not shown)")
    print(f"  expires {token.expires_at_wall}; permissions {permissions or '(none reported)'}")
    report.add(f"repo {ref}", OK, f"entry {entry_id!r}: installation {installation_id}, a token minted")
