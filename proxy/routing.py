"""Routing: a request path becomes an upstream URL, a repo and the auth entry that serves it, or a refusal."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import re2

from .config import AuthEntry, ConfigError, UpstreamConfig
from .errors import (
    AnonymousRefused,
    BadRequestPath,
    HostNotAllowed,
    MethodNotAllowed,
    NotAGitEndpoint,
)

MAX_PATH_LENGTH = 2048
# GitHub's own character set for owners and repos; everything else (and so every encoding trick) is refused.
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_HOST_SEGMENT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d{1,5})?$")


class Service(StrEnum):
    UPLOAD_PACK = "upload-pack"
    RECEIVE_PACK = "receive-pack"
    LFS = "lfs"


@dataclass(frozen=True)
class Endpoint:
    """One git endpoint: the path segments after the repo and what it is for."""

    segments: tuple[str, ...]
    methods: frozenset[str]
    service: Service | None  # None: decided by the `service=` query (info/refs)
    write_methods: frozenset[str] = frozenset()  # methods that change the repo: refused for read-only parties


_WILDCARD = "*"  # one segment of any allowed value (an LFS lock id)
_GET, _POST = frozenset({"GET"}), frozenset({"POST"})
# LFS batch requests say in their body whether they upload; `access` reads it for read-only parties.
LFS_BATCH = Endpoint(("info", "lfs", "objects", "batch"), _POST, Service.LFS)
# Opens every git operation; the one request a dead token can be renewed for and sent again.
INFO_REFS = Endpoint(("info", "refs"), _GET, None)
UPLOAD_PACK = Endpoint(("git-upload-pack",), _POST, Service.UPLOAD_PACK)  # the pack request a mirror may answer
ENDPOINTS: tuple[Endpoint, ...] = (
    INFO_REFS,
    UPLOAD_PACK,
    Endpoint(("git-receive-pack",), _POST, Service.RECEIVE_PACK, write_methods=_POST),
    LFS_BATCH,
    Endpoint(("info", "lfs", "locks"), _GET | _POST, Service.LFS, write_methods=_POST),
    Endpoint(("info", "lfs", "locks", "verify"), _POST, Service.LFS),
    Endpoint(("info", "lfs", "locks", _WILDCARD, "unlock"), _POST, Service.LFS, write_methods=_POST),
)
_INFO_REFS_SERVICES = {
    "service=git-upload-pack": Service.UPLOAD_PACK,
    "service=git-receive-pack": Service.RECEIVE_PACK,
}


@dataclass(frozen=True)
class RepoRef:
    """The repo a request is for, as GitHub names it (no `.git`)."""

    host: str
    owner: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return f"{self.host}/{self.owner}/{self.name}"


@dataclass(frozen=True)
class Route:
    upstream: UpstreamConfig
    repo: RepoRef
    entry: AuthEntry | None
    service: Service
    endpoint: Endpoint
    url: str  # the upstream URL, with the only query string the endpoint may carry
    proxy_prefix: str  # "/<host>": where upstream paths live on this proxy, for rewriting redirects
    # host + baseUrl path + owner/repo (no `.git`): exactly what the entry's pattern matched, and so exactly what
    # access rules must judge. `repo` alone would drop a baseUrl path such as `git.company.local/team-b`.
    matched: str
    repo_url: str  # the repo on the upstream, without an endpoint: what a mirror fetches from


# ---------------------------------------------------------------- url patterns

# A Java named group `(?<name>` (the name starts with a letter) that is not escaped by an odd run of backslashes.
# Lookbehinds `(?<=` and `(?<!` start with `=`/`!`, so they are left alone.
_JAVA_NAMED_GROUP = re.compile(r"(?<!\\)((?:\\\\)*)\(\?<(?=[A-Za-z])")


def translate_java_regex(pattern: str) -> str:
    return _JAVA_NAMED_GROUP.sub(r"\1(?P<", pattern)


class LinearMatch(Protocol):
    def end(self, group: int) -> int: ...


class LinearPattern(Protocol):
    """What the proxy uses of an RE2 pattern (the package ships no type hints)."""

    @property
    def groupindex(self) -> Mapping[str, int]: ...

    def fullmatch(self, text: str) -> LinearMatch | None: ...


def compile_linear(pattern: str) -> LinearPattern:
    """Compile with RE2: matching takes time linear in the input whatever the pattern, so an operator's
    `([a-z0-9]+-?)+` cannot let one crafted repo name freeze the event loop (Python's `re` backtracks
    exponentially on it). Case-insensitive like GitHub; `.` matches newlines as in the patterns' Java origin.
    RE2 has no lookarounds or backreferences: a pattern using them raises `re2.error` and is refused at load."""
    options = re2.Options()
    options.case_sensitive = False
    options.dot_nl = True
    options.log_errors = False  # the error comes back as an exception; RE2 must not also print to stderr
    compiled: LinearPattern = re2.compile(translate_java_regex(pattern), options)
    return compiled


def _engine_error(error: re2.error) -> str:
    reason = error.args[0] if error.args else error
    text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return f"{text} (patterns run on RE2: no lookarounds or backreferences)"


def compile_url_pattern(entry_id: str, pattern: str) -> LinearPattern:
    """Concord's semantics: a full match of `pattern + ".*"`, i.e. a prefix match, case-insensitive like GitHub."""
    try:
        compiled = compile_linear(f"(?:{pattern}).*")
    except re2.error as error:
        raise ConfigError(
            f"auth entry {entry_id!r}: urlPattern '{pattern}' does not compile: {_engine_error(error)}"
        ) from None
    if "baseUrl" not in compiled.groupindex:
        raise ConfigError(
            f"auth entry {entry_id!r}: urlPattern '{pattern}' has no (?<baseUrl>...) group "
            "marking where the repo path starts"
        )
    return compiled


def compile_repo_pattern(where: str, pattern: str) -> LinearPattern:
    """A repos pattern (an access client's, or the mirror's), matched against `Route.matched` and ending at a
    segment boundary (`where` names it in errors):
    `github\\.com/acme/app` never lets a client into `acme/app-secrets`, nor `github\\.com/acme` into `acme-evil`."""
    try:
        return compile_linear(f"(?:{pattern})(?:/.*)?")
    except re2.error as error:
        raise ConfigError(f"{where}: repos pattern '{pattern}' does not compile: {_engine_error(error)}") from None


def base_url_host(pattern: str) -> str | None:
    """The literal host a pattern's baseUrl names (`github\\.com` → github.com), when it names one plainly."""
    base = pattern.partition("(?<baseUrl>")[2] or pattern.partition("(?P<baseUrl>")[2]
    host = base.split("/")[0].split(")")[0].replace("\\.", ".").lower()
    return host if re.fullmatch(r"[a-z0-9.-]+(:\d+)?", host) else None


@dataclass(frozen=True)
class _Rule:
    entry: AuthEntry
    pattern: LinearPattern
    base_url_group: int  # RE2's match objects take group numbers, not names


# ---------------------------------------------------------------- the router


RESOLVED_ROUTES = 256  # routes remembered per router: four endpoints each of 64 repos
# A longer path and query (an LFS lock listing can carry 8 KB of query) is resolved every time: 256 of them would
# hold about 4 MiB, and git's own paths are far shorter.
REMEMBERED_TARGET = 512


class Router:
    """Built once per config (so a reload forgets every route); `resolve_route` is pure and does no I/O."""

    def __init__(self, upstreams: Sequence[UpstreamConfig], entries: Sequence[AuthEntry]) -> None:
        self._upstreams = {upstream.host: upstream for upstream in upstreams}
        self._resolved: dict[tuple[str, str, str], Route] = {}
        self._rules = []
        for entry in entries:
            pattern = compile_url_pattern(entry.id, entry.url_pattern)
            self._rules.append(_Rule(entry, pattern, pattern.groupindex["baseUrl"]))

    @property
    def upstream_hosts(self) -> list[str]:
        return list(self._upstreams)

    def entry_by_id(self, entry_id: str) -> AuthEntry | None:
        return next((rule.entry for rule in self._rules if rule.entry.id == entry_id), None)

    def resolve_route(self, method: str, raw_path: str, query_string: str) -> Route:
        """The route of a request, or the ProxyError that refuses it. Routes found are remembered, a bounded number
        and the oldest out: git asks for the same few paths again and again, and checking a path and matching the
        patterns was the largest part of the proxy's own work on a warm request before it reaches upstream."""
        key = (method, raw_path, query_string)
        route = self._resolved.get(key)
        if route is None:
            route = self._resolve(method, raw_path, query_string)
            if len(raw_path) + len(query_string) <= REMEMBERED_TARGET:
                if len(self._resolved) >= RESOLVED_ROUTES:
                    del self._resolved[next(iter(self._resolved))]
                self._resolved[key] = route
        return route

    def _resolve(self, method: str, raw_path: str, query_string: str) -> Route:
        try:
            host, repo_path, endpoint_segments, endpoint = _split_path(raw_path)
        except NotAGitEndpoint:
            # `/acme/app.git/info/refs` (no host) or `/github.comacme/app.git/...` (a missing slash) end here too:
            # their endpoint only looks wrong because the host is. Saying so is the message that helps.
            self._refuse_unknown_host(raw_path[1:].split("/")[0])
            raise
        upstream = self._upstreams.get(host.lower())
        if upstream is None:
            raise self._host_refusal(host)
        if method not in endpoint.methods:
            raise MethodNotAllowed(f"{method} is not allowed on {'/'.join(endpoint_segments)}")
        service, query = _service_and_query(endpoint, query_string)
        entry, repo = self.match_entry(upstream.host, repo_path)
        if entry is None and not upstream.anonymous:
            raise AnonymousRefused(f"no auth entry matches {repo} and anonymous access to {upstream.host} is disabled")
        repo_url = f"{upstream.url}/{'/'.join(repo_path)}"
        url = f"{repo_url}/{'/'.join(endpoint_segments)}"
        matched = f"{upstream.host}/{'/'.join(repo_path)}".removesuffix(".git")
        return Route(
            upstream, repo, entry, service, endpoint, f"{url}?{query}" if query else url, f"/{host}", matched, repo_url
        )

    def _refuse_unknown_host(self, host: str) -> None:
        if host.lower() not in self._upstreams:
            raise self._host_refusal(host)

    def _host_refusal(self, host: str) -> HostNotAllowed:
        """Names the hosts there are and the form paths take, since the likeliest cause is an insteadOf rule."""
        hosts = list(self._upstreams)
        known = ", ".join(hosts) or "none"
        example = hosts[0] if hosts else "github.com"
        glued = next((h for h in hosts if host.lower().startswith(h) and len(host) > len(h)), None)
        hint = (
            f"a slash is missing after {glued!r}: the insteadOf URL must end with '/{glued}/'"
            if glued
            else f"paths start with the host, /{example}/<owner>/<repo>.git"
        )
        return HostNotAllowed(
            f"host {host!r} is not an allowed upstream of this proxy (configured: {known}); {hint}, as in "
            f'git config --global url."http://<this proxy>/{example}/".insteadOf "https://{example}/"'
        )

    def match_entry(self, host: str, repo_path: Sequence[str]) -> tuple[AuthEntry | None, RepoRef]:
        """The first entry whose pattern matches `host/path` wins; owner/repo follow its `baseUrl`."""
        target = f"{host}/{'/'.join(repo_path)}"
        for rule in self._rules:
            match = rule.pattern.fullmatch(target)
            if match:
                return rule.entry, _repo_after(host, target[match.end(rule.base_url_group) :], rule.entry.id)
        return None, _repo_after(host, "/".join(repo_path), None)


def _split_path(raw_path: str) -> tuple[str, tuple[str, ...], tuple[str, ...], Endpoint]:
    """`/<host>/<repo path...>/<endpoint...>` checked strictly, segment by segment, before anything else."""
    if len(raw_path) > MAX_PATH_LENGTH:
        raise BadRequestPath(f"request path longer than {MAX_PATH_LENGTH} bytes")
    if not raw_path.startswith("/"):
        raise BadRequestPath("only origin-form request targets (/host/owner/repo/...) are accepted")
    segments = raw_path[1:].split("/")
    host, rest = segments[0], segments[1:]
    if not _HOST_SEGMENT.match(host):
        raise BadRequestPath(f"{host!r} is not a host; use /<host>/<owner>/<repo>.git")
    for segment in rest:
        if not segment:
            # `//`: an insteadOf rule whose two URLs do not both end with a slash.
            raise BadRequestPath("empty path segment (//): both URLs of an insteadOf rule must end with '/'")
        if not _SEGMENT.match(segment) or segment in (".", ".."):
            raise BadRequestPath(f"path segment {segment!r} is not allowed")
    for length in range(len(rest) - 1, 1, -1):  # the shortest endpoint suffix after at least owner/repo
        endpoint = _find_endpoint(tuple(rest[length:]))
        if endpoint is not None:
            return host, tuple(rest[:length]), tuple(rest[length:]), endpoint
    raise NotAGitEndpoint(
        "only git smart-HTTP endpoints (info/refs, git-upload-pack, git-receive-pack) and the LFS API are proxied"
    )


def _find_endpoint(segments: tuple[str, ...]) -> Endpoint | None:
    for endpoint in ENDPOINTS:
        if len(endpoint.segments) == len(segments) and all(
            want in (_WILDCARD, got) for want, got in zip(endpoint.segments, segments, strict=True)
        ):
            return endpoint
    return None


def _service_and_query(endpoint: Endpoint, query_string: str) -> tuple[Service, str]:
    if endpoint.service is None:
        service = _INFO_REFS_SERVICES.get(query_string)
        if service is None:
            raise NotAGitEndpoint(
                "info/refs needs ?service=git-upload-pack or git-receive-pack; dumb HTTP is not proxied"
            )
        return service, query_string
    # Only LFS lock listings carry a query (path, id, cursor, limit, refspec); git's POSTs never do.
    return endpoint.service, query_string if endpoint.service is Service.LFS else ""


def _repo_after(host: str, path_after_base: str, entry_id: str | None) -> RepoRef:
    parts = [part for part in path_after_base.split("/") if part]
    where = f"after the baseUrl of auth entry {entry_id!r}" if entry_id else "after the host"
    # With a credential at stake, exactly <owner>/<repo>: deeper paths are not git repos on GitHub.
    if len(parts) < 2 or (entry_id is not None and len(parts) != 2):
        raise BadRequestPath(f"expected <owner>/<repo> {where}")
    name = parts[1].removesuffix(".git")
    if name in ("", ".", ".."):
        raise BadRequestPath(f"{parts[1]!r} is not a repository name")
    return RepoRef(host, parts[0], name)
