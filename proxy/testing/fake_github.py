"""A fake GitHub for tests and the demo: real git over smart HTTP, GitHub's auth rules, and a record of traffic."""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .fake_app_api import FakeAppApi, Grant
from .fake_lfs import FakeLfs
from .git_backend import find_http_backend, serve_with_http_backend
from .gitcli import git_env, run_git_sync

_GIT_PATH = re.compile(
    r"^/(?P<owner>[A-Za-z0-9._-]+)/(?P<repo>[A-Za-z0-9._-]+?)(?:\.git)?"
    r"/(?P<endpoint>info/refs|git-upload-pack|git-receive-pack|info/lfs/objects/batch|info/lfs/locks.*)$"
)


@dataclass
class SeenRequest:
    """One request as the fake received it. `token` is kept so tests can check exactly what was sent."""

    method: str
    path: str
    query: str
    username: str | None
    token: str | None
    authorized: bool
    headers: Mapping[str, str]
    status: int = 0  # set as the response starts, before the client can see any of it

    @property
    def carried_credentials(self) -> bool:
        return self.token is not None

    @property
    def is_git(self) -> bool:
        return bool(_GIT_PATH.match(self.path))

    @property
    def content_encoding(self) -> str | None:
        return self.headers.get("Content-Encoding")

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()


@dataclass
class FakeGitHub:
    """Git endpoints under /<owner>/<repo>, the App API under / and /api/v3 (see `apps`), one clock for both."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fake-github-")))
    seen: list[SeenRequest] = field(default_factory=list)
    grants: dict[str, Grant] = field(default_factory=dict)
    public_repos: set[str] = field(default_factory=set)
    clock_offset: float = 0.0  # seconds this GitHub's clock is ahead of the machine's (Date headers, JWT checks)
    git_bytes_per_second: float | None = None  # throttle git responses, to keep a transfer going for a while
    # Pack requests (POST git-upload-pack) that reached a repo, and the response bytes they were sent: what a
    # clone really took from "GitHub", so tests can show that a mirror spared it.
    upload_pack_requests: int = 0
    upload_pack_bytes: int = 0
    # github.com's real answer to a revoked, expired or unknown token on a private repo: 404 "Repository not
    # found", so that the repo's existence is not revealed. Off: a 401 with a Basic challenge, as GHES answers.
    dead_tokens_get_404: bool = False
    reject_all_tokens: bool = False  # a broken upstream: 401 to every request that carries a token
    tokens_rejected_on: set[str] = field(default_factory=set)  # lowercase owner/repo that 401 any token
    lfs: FakeLfs | None = None  # a GitHub-like LFS (batch API here, objects on its storage host); None: a stub
    url: str = ""
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        self.repos_root = self.root / "repos"
        self.repos_root.mkdir(parents=True, exist_ok=True)
        self._backend = find_http_backend()
        self.apps = FakeAppApi(self.grants, self.now, repo_path=self.repo_path, git_home=self.root / "home")

    def now(self) -> float:
        return time.time() + self.clock_offset

    # ------------------------------------------------------------ set-up

    def add_token(self, token: str, repos: Iterable[str] | None = None, *, write: bool = True) -> Grant:
        """A static token (a PAT): these repos (or all), never expiring."""
        grant = Grant(token, frozenset(r.lower() for r in repos) if repos is not None else None, write)
        self.grants[token] = grant
        return grant

    def repo_path(self, full_name: str) -> Path:
        owner, name = full_name.lower().split("/")
        return self.repos_root / owner / f"{name}.git"

    def create_repo(
        self, full_name: str, files: Mapping[str, bytes] | None = None, *, public: bool = False, branch: str = "main"
    ) -> Path:
        """A bare repo, with one commit holding `files` when given."""
        bare = self.repo_path(full_name)
        env = git_env(self.root / "home")
        run_git_sync("init", "--quiet", "--bare", f"--initial-branch={branch}", str(bare), env=env).check()
        # As on GitHub: pushes over HTTP, partial clones (--filter) and fetching any reachable commit.
        for key in ("http.receivepack", "uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
            run_git_sync("config", key, "true", env=env, cwd=bare).check()
        if public:
            self.public_repos.add(full_name.lower())
        if files:
            with tempfile.TemporaryDirectory(dir=self.root) as work:
                worktree = Path(work)
                run_git_sync("init", "--quiet", f"--initial-branch={branch}", env=env, cwd=worktree).check()
                for name, content in files.items():
                    (worktree / name).parent.mkdir(parents=True, exist_ok=True)
                    (worktree / name).write_bytes(content)
                run_git_sync("add", "-A", env=env, cwd=worktree).check()
                run_git_sync("commit", "--quiet", "-m", "initial commit", env=env, cwd=worktree).check()
                run_git_sync("push", "--quiet", str(bare), branch, env=env, cwd=worktree).check()
        return bare

    def commit(self, full_name: str, name: str, content: bytes) -> str:
        """A commit pushed straight to the repo, behind any proxy's back; its id."""
        env = git_env(self.root / "home")
        with tempfile.TemporaryDirectory(dir=self.root) as work:
            worktree = Path(work) / "clone"
            run_git_sync("clone", "--quiet", str(self.repo_path(full_name)), str(worktree), env=env).check()
            (worktree / name).write_bytes(content)
            run_git_sync("add", name, env=env, cwd=worktree).check()
            run_git_sync("commit", "--quiet", "-m", f"add {name}", env=env, cwd=worktree).check()
            run_git_sync("push", "--quiet", "origin", "HEAD", env=env, cwd=worktree).check()
            return run_git_sync("rev-parse", "HEAD", env=env, cwd=worktree).check().stdout.strip()

    def purge(self, full_name: str, branch: str, to: str) -> None:
        """A commit removed for good, as GitHub does on request: `branch` forced back to `to`, the reflog expired
        and the repo gc'd, so that what only the old tip reached is gone (`not our ref` from now on)."""
        env = git_env(self.root / "home")
        repo = self.repo_path(full_name)
        for args in (("update-ref", f"refs/heads/{branch}", to), ("reflog", "expire", "--expire=now", "--all"),
                     ("gc", "--quiet", "--prune=now")):  # fmt: skip
            run_git_sync(*args, env=env, cwd=repo).check()

    def head(self, full_name: str) -> str:
        """The commit id the repo's HEAD points at."""
        env = git_env(self.root / "home")
        return run_git_sync("rev-parse", "HEAD", env=env, cwd=self.repo_path(full_name)).check().stdout.strip()

    # ------------------------------------------------------------ queries for tests

    @property
    def git_requests(self) -> list[SeenRequest]:
        return [seen for seen in self.seen if seen.is_git]

    # ------------------------------------------------------------ serving

    def make_app(self) -> web.Application:
        # As on the proxy, bodies stay compressed so tests can see exactly what arrived.
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{path:.*}", self._handle)
        app.on_response_prepare.append(_record_status)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound_port}"
        return self.url

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # Recorded on arrival, so a test that has its answer can already see the request.
        username, token = _basic_credentials(request)
        seen = SeenRequest(
            request.method, request.path, request.query_string, username, token,
            authorized=token in self.grants, headers=dict(request.headers),
        )  # fmt: skip
        self.seen.append(seen)
        request[_SEEN] = seen
        return await self._respond(request, username, token)

    async def _respond(self, request: web.Request, username: str | None, token: str | None) -> web.StreamResponse:
        if self.apps.handles(request.path):
            return await self.apps.respond(request)
        match = _GIT_PATH.match(request.path)
        if not match:
            return web.json_response({"message": "Not Found"}, status=404)
        full_name = f"{match['owner']}/{match['repo']}".lower()
        push = match["endpoint"] == "git-receive-pack" or request.query_string == "service=git-receive-pack"
        refusal = self._authorize(full_name, token, push)
        if refusal is not None:
            return refusal
        if not self.repo_path(full_name).is_dir():
            return _text(404, "Repository not found.")
        if match["endpoint"] == "info/lfs/objects/batch" and self.lfs is not None:
            return await self.lfs.batch_answer(request, full_name)
        if match["endpoint"].startswith("info/lfs/locks") and self.lfs is not None:
            return _locks_answer(match["endpoint"])
        if match["endpoint"].startswith("info/lfs/"):
            return await _lfs_answer(request)
        path_info = f"/{full_name}.git/{match['endpoint']}"
        count_bytes = None
        if match["endpoint"] == "git-upload-pack":
            self.upload_pack_requests += 1
            count_bytes = self._count_upload_pack_bytes
        return await serve_with_http_backend(
            request, self.repos_root, path_info, username or "anonymous", self._backend,
            self.git_bytes_per_second, count_bytes,
        )  # fmt: skip

    def _count_upload_pack_bytes(self, size: int) -> None:
        self.upload_pack_bytes += size

    def _authorize(self, full_name: str, token: str | None, push: bool) -> web.Response | None:
        """GitHub's rules: bad or missing credentials on a private repo are a 401 that asks for Basic auth."""
        rejecting = self.reject_all_tokens or full_name in self.tokens_rejected_on
        grant = self.grants.get(token) if token is not None and not rejecting else None
        if grant is not None and grant.expires_at is not None and self.now() >= grant.expires_at:
            grant = None  # expired installation tokens are refused like unknown ones
        if grant is None:
            if token is None and full_name in self.public_repos and not push:
                return None
            if token is not None and self.dead_tokens_get_404 and not rejecting:
                return _text(404, "Repository not found.")
            return web.Response(
                status=401, text="Invalid username or token.\n", headers={"WWW-Authenticate": 'Basic realm="GitHub"'}
            )
        if not grant.covers(full_name):
            return _text(404, "Repository not found.")
        if push and not grant.write:
            return _text(403, f"Permission to {full_name} denied.")
        return None


_SEEN = web.RequestKey("fake_github_seen", SeenRequest)


async def _record_status(request: web.Request, response: web.StreamResponse) -> None:
    if _SEEN in request:
        request[_SEEN].status = response.status


def _basic_credentials(request: web.Request) -> tuple[str | None, str | None]:
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        username, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return username, password


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


async def _lfs_answer(request: web.Request) -> web.Response:
    """Enough of the LFS batch API to prove a request arrived with credentials: every object is missing."""
    body = await request.json() if request.body_exists else {}
    objects = [
        {"oid": item.get("oid"), "size": item.get("size"), "error": {"code": 404, "message": "Object does not exist"}}
        for item in body.get("objects", [])
    ]
    return web.json_response({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")


def _locks_answer(endpoint: str) -> web.Response:
    """No locks held: what git-lfs asks before a push (locks/verify) and when listing them."""
    answer: dict[str, object] = {"ours": [], "theirs": []} if endpoint.endswith("verify") else {"locks": []}
    return web.json_response(answer, content_type="application/vnd.git-lfs+json")
