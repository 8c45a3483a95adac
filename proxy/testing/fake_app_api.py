"""The API half of the fake GitHub: JWT checks with GitHub's rules and messages, installations, mints, and the
compare API (real git on the fake's repos, with installation tokens)."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import secrets
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from .gitcli import git_env, run_git
from .github_objects import repository_object

# GitHub's own wording, which the proxy's skew detection and error messages rely on.
MSG_NOT_DECODED = "A JSON web token could not be decoded"
MSG_IAT = "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued"
MSG_EXP = (
    "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion "
    "expires"
)
MSG_EXP_TOO_FAR = "'Expiration time' claim ('exp') is too far in the future"
MSG_NO_INTEGRATION = "Integration not found"
MSG_BAD_REPOS = "There is at least one repository that does not exist or is not accessible to the parent installation."
MSG_BAD_PERMISSIONS = "The permissions requested are not granted to this installation."
_LEVELS = {"read": 1, "write": 2, "admin": 3}

_API_PATH = re.compile(
    r"^(?:/api/v3)?(?P<path>/app|/repos/[^/]+/[^/]+/installation|/orgs/[^/]+/installation|/users/[^/]+/installation"
    r"|/app/installations/\d+/access_tokens|/installation/token|/rate_limit|/repos/[^/]+/[^/]+/compare/.+)$"
)
_KINDS = {"lookup": "/installation", "mint": "/access_tokens", "app": "/app", "rate_limit": "/rate_limit"}
_COMPARE = "/compare/"  # GET /repos/{owner}/{repo}/compare/{base}...{head}: kind "compare"


@dataclass
class FakeApp:
    app_id: int
    client_id: str
    slug: str | None  # None: GET /app answers without one (GitHub's description does not require it)
    public_key: rsa.RSAPublicKey


@dataclass
class FakeInstallation:
    id: int
    app: FakeApp
    account: str  # lowercase login
    repos: frozenset[str] | None  # lowercase owner/repo; None: every repo of the account
    permissions: dict[str, str]
    account_type: str = "Organization"  # or "User": which of /orgs/… and /users/…/installation answers

    def covers(self, full_name: str) -> bool:
        owner = full_name.split("/")[0]
        return owner == self.account and (self.repos is None or full_name in self.repos)


@dataclass
class ApiCall:
    method: str
    path: str
    status: int


@dataclass
class Grant:
    """What a token may do on the git endpoints: repos, push, and until when (on the fake's clock)."""

    token: str
    repos: frozenset[str] | None = None  # lowercase owner/repo; None: every repo (of `account`, if set)
    write: bool = True
    account: str | None = None
    expires_at: float | None = None
    installation_id: int | None = None

    def covers(self, full_name: str) -> bool:
        if self.account is not None and full_name.split("/")[0] != self.account:
            return False
        return self.repos is None or full_name.lower() in self.repos


@dataclass(frozen=True)
class CannedAnswer:
    """An answer served as is, whatever was asked: for GitHub at its worst (see FakeAppApi.script_next)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, headers: Mapping[str, str] | None = None) -> CannedAnswer:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def error(cls, status: int, message: str, headers: Mapping[str, str] | None = None) -> CannedAnswer:
        return cls.json(status, {"message": message, "documentation_url": "https://docs.github.com/rest"}, headers)

    @classmethod
    def gzip_bomb(cls, status: int = 200, size_mib: int = 256) -> CannedAnswer:
        """A few hundred KiB on the wire that inflate to `size_mib` MiB of JSON-looking bytes."""
        return cls(status, _gzip_bomb(size_mib), {"Content-Type": "application/json", "Content-Encoding": "gzip"})


@functools.lru_cache(maxsize=4)
def _gzip_bomb(size_mib: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    megabyte = b" " * (1024 * 1024)
    parts = [packer.compress(b'{"id": 1, "padding": "')]
    parts += [packer.compress(megabyte) for _ in range(size_mib)]
    return b"".join([*parts, packer.compress(b'"}'), packer.flush()])


@dataclass
class FakeAppApi:
    """Owned by FakeGitHub, which routes API paths here and shares its token grants and clock."""

    grants: dict[str, Grant]
    now: Callable[[], float]
    apps: list[FakeApp] = field(default_factory=list)
    installations: dict[int, FakeInstallation] = field(default_factory=dict)
    calls: list[ApiCall] = field(default_factory=list)
    minted_tokens: list[str] = field(default_factory=list)
    mint_requests: list[dict[str, Any]] = field(default_factory=list)  # the JSON bodies of mint calls
    jwts_seen: list[str] = field(default_factory=list)
    # ---- test controls
    token_lifetime: float = 3600.0
    mint_latency: float = 0.0
    long_tokens: bool = False  # the stateless ghs_<appid>_<jwt> form: ~520 characters, with dots
    # Applied to every successful mint answer (the token is minted and granted all the same): a malformed answer.
    mangle_mints: Callable[[dict[str, Any]], Any] | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)  # on every API answer, Date included
    repo_path: Callable[[str], Path] | None = None  # owner/repo -> bare repo: the compare API's git
    git_home: Path | None = None
    _scripts: dict[str, deque[CannedAnswer]] = field(default_factory=dict)
    _next_installation_id: int = 1001  # never reused, as on GitHub: a reinstall gets a new id
    _failures: deque[int] = field(default_factory=deque)
    _lookup_failures: deque[int] = field(default_factory=deque)
    _rate_limits: deque[dict[str, str]] = field(default_factory=deque)

    # ------------------------------------------------------------ set-up and controls

    def add_app(self, key: rsa.RSAPrivateKey, *, slug: str | None = "acme-app") -> FakeApp:
        number = len(self.apps) + 1
        app = FakeApp(100 + number, f"Iv23li{secrets.token_hex(5)}", slug, key.public_key())
        self.apps.append(app)
        return app

    def add_installation(
        self, app: FakeApp, account: str, repos: Iterable[str] | None = None,
        permissions: dict[str, str] | None = None, *, account_type: str = "Organization",
    ) -> FakeInstallation:  # fmt: skip
        """`account_type` is "Organization" or "User"; `repos` None means every repo of the account."""
        installation = FakeInstallation(
            self._next_installation_id, app, account.lower(),
            frozenset(r.lower() for r in repos) if repos is not None else None,
            permissions or {"contents": "write", "metadata": "read"}, account_type,
        )  # fmt: skip
        self.installations[installation.id] = installation
        self._next_installation_id += 1
        return installation

    def reinstall(self, installation: FakeInstallation) -> FakeInstallation:
        """The app removed and installed again: the old id answers 404 from now on."""
        del self.installations[installation.id]
        return self.add_installation(installation.app, installation.account, installation.repos,
                                     installation.permissions, account_type=installation.account_type)  # fmt: skip

    def fail_next_mints(self, count: int, status: int = 500) -> None:
        self._failures.extend([status] * count)

    def fail_next_lookups(self, count: int, status: int = 500) -> None:
        self._lookup_failures.extend([status] * count)

    def rate_limit_next_mints(self, count: int, *, retry_after: float | None = None, reset_in: float = 3600) -> None:
        """With retry_after: a secondary limit with Retry-After. Without: a primary limit with x-ratelimit-reset."""
        if retry_after is not None:
            headers = {"Retry-After": str(int(retry_after))}
        else:
            headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(self.now() + reset_in))}
        self._rate_limits.extend([headers] * count)

    def script_next(self, kind: str, *answers: CannedAnswer) -> None:
        """The next calls of `kind` (lookup, mint, app, rate_limit, compare) get these answers, unauthenticated and
        as is."""
        assert kind in _KINDS or kind == "compare", kind
        self._scripts.setdefault(kind, deque()).extend(answers)

    def clear_scripts(self) -> None:
        self._scripts.clear()

    def revoke_all_tokens(self) -> None:
        for token in [t for t, grant in self.grants.items() if grant.installation_id is not None]:
            del self.grants[token]

    def statuses(self, kind: str) -> list[int]:
        """`lookup`, `mint`, `app` or `rate_limit`: the status of every such call so far, in order."""
        return [call.status for call in self.calls if _kind_of(call.path) == kind]

    def count(self, kind: str) -> int:
        """`lookup`, `mint`, `app` or `rate_limit`: successful calls of that kind so far."""
        return sum(1 for status in self.statuses(kind) if status in (200, 201))

    # ------------------------------------------------------------ serving

    @staticmethod
    def handles(path: str) -> bool:
        return bool(_API_PATH.match(path))

    async def respond(self, request: web.Request) -> web.Response:
        match = _API_PATH.match(request.path)
        assert match
        path = match["path"]
        script = self._scripts.get(_kind_of(path) or "")
        if script:
            canned = script.popleft()
            response = web.Response(status=canned.status, body=canned.body, headers=dict(canned.headers))
        else:
            response = await self._dispatch(request, path)
        if "Date" not in response.headers:
            response.headers["Date"] = format_datetime(datetime.fromtimestamp(self.now(), UTC), usegmt=True)
        response.headers.update(self.extra_headers)
        self.calls.append(ApiCall(request.method, path, response.status))
        return response

    async def _dispatch(self, request: web.Request, path: str) -> web.Response:
        if path == "/installation/token" and request.method == "DELETE":
            return self._revoke(request)
        if path == "/rate_limit" and request.method == "GET":
            return self._rate_limit(request)
        if _COMPARE in path and request.method == "GET":
            return await self._compare(request, path)
        app = self._authenticate(request)
        if isinstance(app, web.Response):
            return app
        parts = path.strip("/").split("/")
        if path == "/app" and request.method == "GET":
            return web.json_response(self._app_json(app))
        if parts[-1] == "installation" and request.method == "GET":
            return self._find_installation(request, app, parts)
        if parts[-1] == "access_tokens" and request.method == "POST":
            return await self._mint(request, app, int(parts[2]))
        return _message(404, "Not Found")

    @staticmethod
    def _app_json(app: FakeApp) -> dict[str, Any]:
        answer: dict[str, Any] = {"id": app.app_id, "client_id": app.client_id, "name": "Acme CI"}
        if app.slug is not None:
            answer.update(slug=app.slug, name=app.slug.replace("-", " ").title())
        return answer

    def _authenticate(self, request: web.Request) -> FakeApp | web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _message(401, "Requires authentication")
        self.jwts_seen.append(token)
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            if jwt.get_unverified_header(token).get("alg") != "RS256":
                return _message(401, MSG_NOT_DECODED)
        except jwt.PyJWTError:
            return _message(401, MSG_NOT_DECODED)
        issuer = str(unverified.get("iss"))
        app = next((a for a in self.apps if issuer in (str(a.app_id), a.client_id)), None)
        if app is None:
            return _message(401, MSG_NO_INTEGRATION)
        try:
            claims = jwt.decode(
                token, app.public_key, algorithms=["RS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )  # fmt: skip
        except jwt.PyJWTError:
            return _message(401, MSG_NOT_DECODED)
        return self._check_times(claims) or app

    def _check_times(self, claims: dict[str, Any]) -> web.Response | None:
        now = self.now()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or iat > now:
            return _message(401, MSG_IAT)
        if not isinstance(exp, int | float) or exp <= now:
            return _message(401, MSG_EXP)
        if exp > now + 600:
            return _message(401, MSG_EXP_TOO_FAR)
        return None

    def _find_installation(self, request: web.Request, app: FakeApp, parts: list[str]) -> web.Response:
        if self._lookup_failures:
            return _message(self._lookup_failures.popleft(), "Server Error")
        account = parts[1].lower()
        full_name = f"{account}/{parts[2].lower()}" if parts[0] == "repos" else None
        # As on GitHub: /orgs/… answers for organisations only, /users/… for user accounts only.
        account_type = {"orgs": "Organization", "users": "User"}.get(parts[0])
        for installation in self.installations.values():
            mine = installation.app is app and installation.account == account
            if account_type is not None and installation.account_type != account_type:
                continue
            if mine and (full_name is None or installation.covers(full_name)):
                return web.json_response(self._installation_json(request, installation))
        return _message(404, "Not Found")

    def _installation_json(self, request: web.Request, installation: FakeInstallation) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}{'/api/v3' if request.path.startswith('/api/v3') else ''}"
        return {
            "id": installation.id,
            "app_id": installation.app.app_id,
            "account": {"login": installation.account, "type": installation.account_type},
            "access_tokens_url": f"{base}/app/installations/{installation.id}/access_tokens",
            "permissions": installation.permissions,
            "repository_selection": "all" if installation.repos is None else "selected",
        }

    async def _mint(self, request: web.Request, app: FakeApp, installation_id: int) -> web.Response:
        if self.mint_latency:
            await asyncio.sleep(self.mint_latency)
        if self._failures:
            return _message(self._failures.popleft(), "Server Error")
        if self._rate_limits:
            headers = self._rate_limits.popleft()
            return _message(403, "You have exceeded a secondary rate limit.", headers)
        installation = self.installations.get(installation_id)
        if installation is None or installation.app is not app:
            return _message(404, "Not Found")
        body = await request.json() if request.body_exists else {}
        self.mint_requests.append(body)
        repos, permissions = installation.repos, dict(installation.permissions)
        if body.get("repositories"):
            repos = frozenset(f"{installation.account}/{name.lower()}" for name in body["repositories"])
            if not all(installation.covers(name) for name in repos):
                return _message(422, MSG_BAD_REPOS)
        if body.get("permissions"):
            wanted: dict[str, str] = body["permissions"]
            granted = installation.permissions
            if any(_LEVELS.get(level, 9) > _LEVELS.get(granted.get(name, ""), 0) for name, level in wanted.items()):
                return _message(422, MSG_BAD_PERMISSIONS)
            permissions = wanted
        return self._issue(installation, repos, permissions)

    def _issue(
        self, installation: FakeInstallation, repos: frozenset[str] | None, permissions: dict[str, str]
    ) -> web.Response:
        token = self._new_token(installation.app)
        expires_at = self.now() + self.token_lifetime
        self.grants[token] = Grant(token, repos, permissions.get("contents") == "write", installation.account,
                                   expires_at, installation.id)  # fmt: skip
        self.minted_tokens.append(token)
        answer: dict[str, Any] = {
            "token": token,
            "expires_at": datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "permissions": permissions,
            "repository_selection": "all" if repos is None else "selected",
        }
        if repos is not None:  # as GitHub does: every selected repository, each a full repository object
            answer["repositories"] = [
                repository_object(r, 5000 + i, installation.id) for i, r in enumerate(sorted(repos))
            ]
        if self.mangle_mints is not None:
            return web.Response(text=json.dumps(self.mangle_mints(answer)), status=201, content_type="application/json")
        return web.json_response(answer, status=201)

    def _new_token(self, app: FakeApp) -> str:
        if not self.long_tokens:
            return "ghs_" + secrets.token_urlsafe(27).replace("-", "A").replace("_", "b")[:36]

        def segment(size: int) -> str:
            return base64.urlsafe_b64encode(secrets.token_bytes(size)).decode().rstrip("=")

        return f"ghs_{app.app_id}_{segment(27)}.{segment(260)}.{segment(96)}"

    def _rate_limit(self, request: web.Request) -> web.Response:
        """GitHub's GET /rate_limit: free of quota, and a 401 for a token that is revoked, expired or unknown."""
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        grant = self.grants.get(token)
        if grant is None or (grant.expires_at is not None and self.now() >= grant.expires_at):
            return _message(401, "Bad credentials")
        window = {"limit": 5000, "used": 1, "remaining": 4999, "reset": int(self.now()) + 3600}
        # API version 2026-03-10's shape: no top-level `rate` (deprecated since 2021), only `resources`.
        return web.json_response({"resources": {"core": window, "search": {**window, "limit": 30}}})

    async def _compare(self, request: web.Request, path: str) -> web.Response:
        """GitHub's compare API, computed by git on the repo: 404 `Not Found` for a commit it lacks (or a token that
        cannot see the repo), 404 `No common ancestor` for unrelated histories, 401 for a dead token."""
        _, owner, name, _, basehead = path.strip("/").split("/", 4)
        grant = self.grants.get(_api_token(request.headers.get("Authorization", "")) or "")
        if grant is not None and grant.expires_at is not None and self.now() >= grant.expires_at:
            return _message(401, "Bad credentials")
        repo = self.repo_path(f"{owner}/{name}") if self.repo_path is not None else None
        if grant is None or not grant.covers(f"{owner}/{name}".lower()) or repo is None or not repo.is_dir():
            return _message(404, "Not Found")
        git = functools.partial(run_git, env=git_env(self.git_home or repo.parent / ".home"), cwd=repo)
        base, _, head = basehead.partition("...")
        found = [await git("rev-parse", "--verify", "--quiet", f"{x}^{{commit}}") for x in (base, head)]
        if not head or base.startswith("-") or head.startswith("-") or any(c.returncode for c in found):
            return _message(404, "Not Found")
        base_id, head_id = (commit.stdout.strip() for commit in found)
        merge_base = (await git("merge-base", base_id, head_id)).stdout.strip()
        if not merge_base:
            return _message(404, f"No common ancestor between {base} and {head}.")
        counted = await git("rev-list", "--left-right", "--count", f"{base_id}...{head_id}")
        behind, ahead = map(int, counted.check().stdout.split())
        status = "diverged" if ahead and behind else "ahead" if ahead else "behind" if behind else "identical"
        per_page = request.query.get("per_page", "")
        listed = (await git("log", "--reverse", f"--format={_LOG_FORMAT}", f"{base_id}..{head_id}")).stdout
        commits = [record for record in listed.split("\x01") if record.strip()]
        numstat = (await git("diff", "--numstat", merge_base, head_id)).stdout.splitlines()
        api = f"{request.scheme}://{request.host}{'/api/v3' if request.path.startswith('/api/v3') else ''}"
        url, html = f"{api}/repos/{owner}/{name}", f"https://github.com/{owner}/{name}"
        shown = [(await git("show", "-s", f"--format={_LOG_FORMAT}", c)).stdout for c in (base_id, merge_base)]
        return web.json_response({
            "url": f"{url}/compare/{basehead}", "html_url": f"{html}/compare/{basehead}",
            "permalink_url": f"{html}/compare/{owner}:{base_id[:7]}...{owner}:{head_id[:7]}",
            "diff_url": f"{html}/compare/{basehead}.diff", "patch_url": f"{html}/compare/{basehead}.patch",
            "base_commit": _commit_json(url, html, shown[0]), "merge_base_commit": _commit_json(url, html, shown[1]),
            "status": status, "ahead_by": ahead, "behind_by": behind, "total_commits": ahead,
            "commits": [_commit_json(url, html, c) for c in commits[: int(per_page) if per_page.isdigit() else 250]],
            "files": [_file_json(line) for line in numstat[:300]],
        })  # fmt: skip

    def _revoke(self, request: web.Request) -> web.Response:
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        if self.grants.pop(token, None) is None:
            return _message(401, "Bad credentials")
        return web.Response(status=204)


def _kind_of(path: str) -> str | None:
    if _COMPARE in path:
        return "compare"
    return next((kind for kind, suffix in _KINDS.items() if path.endswith(suffix)), None)


def _message(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"message": message, "documentation_url": "https://docs.github.com/rest"}, status=status, headers=headers
    )


# ------------------------------------------------------------ the compare API's objects

_LOG_FORMAT = "%H%x00%T%x00%P%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%B%x01"


def _api_token(header: str) -> str | None:
    """The token of `Bearer`, `token` or Basic (`x-access-token:<token>`) authorization, as GitHub's API takes."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token"):
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2] or None
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _commit_json(url: str, html: str, record: str) -> dict[str, Any]:
    """GitHub's `commit` object, as the compare API lists it (without `stats` and `files`)."""
    sha, tree, parents, an, ae, ad, cn, ce, cd, message = record.strip("\n\x01").split("\x00", 9)
    return {
        "sha": sha, "node_id": f"C_kwDO{sha[:20]}", "url": f"{url}/commits/{sha}", "html_url": f"{html}/commit/{sha}",
        "comments_url": f"{url}/commits/{sha}/comments", "author": None, "committer": None,
        "commit": {
            "author": {"name": an, "email": ae, "date": ad}, "committer": {"name": cn, "email": ce, "date": cd},
            "message": message.rstrip("\n"), "tree": {"sha": tree, "url": f"{url}/git/trees/{tree}"},
            "url": f"{url}/git/commits/{sha}", "comment_count": 0,
            "verification": {"verified": False, "reason": "unsigned", "signature": None, "payload": None},
        },
        "parents": [{"sha": p, "url": f"{url}/commits/{p}", "html_url": f"{html}/commit/{p}"} for p in parents.split()],
    }  # fmt: skip


def _file_json(line: str) -> dict[str, Any]:
    added, deleted, filename = line.split("\t", 2)
    additions, deletions = (int(n) if n.isdigit() else 0 for n in (added, deleted))
    return {
        "filename": filename, "status": "modified", "additions": additions, "deletions": deletions,
        "changes": additions + deletions,
    }  # fmt: skip
