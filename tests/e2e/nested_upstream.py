"""An upstream that serves repos at nested paths (GHES under a prefix, GitLab subgroups) over real http-backend,
with a per-repo token list: what a baseUrl with a path needs to be tested against."""

from __future__ import annotations

import base64
import re
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.testing import git_env, run_git_sync
from proxy.testing.git_backend import find_http_backend, serve_with_http_backend

_PATH = re.compile(
    r"^/(?P<repo>(?:[A-Za-z0-9._-]+/){1,3}[A-Za-z0-9._-]+?)(?:\.git)?/(?P<endpoint>info/refs|git-upload-pack)$"
)


class NestedUpstream:
    """Repos at arbitrary depth; `acl[repo_path] = {tokens}` (None token = anonymous ok)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.acl: dict[str, set[str | None]] = {}
        self.upload_pack_posts: list[str] = []
        self.info_refs: list[str] = []
        self._backend = find_http_backend()
        self._runner: web.AppRunner | None = None
        self.url = ""

    def create(self, path: str, files: dict[str, bytes], tokens: set[str | None]) -> str:
        bare = self.root / f"{path}.git"
        env = git_env(self.root / "home")
        run_git_sync("init", "--quiet", "--bare", "--initial-branch=main", str(bare), env=env).check()
        for key in ("uploadpack.allowFilter", "uploadpack.allowAnySHA1InWant"):
            run_git_sync("config", key, "true", env=env, cwd=bare).check()
        with tempfile.TemporaryDirectory(dir=self.root) as work:
            w = Path(work)
            run_git_sync("init", "--quiet", "--initial-branch=main", env=env, cwd=w).check()
            for name, content in files.items():
                (w / name).write_bytes(content)
            run_git_sync("add", "-A", env=env, cwd=w).check()
            run_git_sync("commit", "--quiet", "-m", f"commit of {path}", env=env, cwd=w).check()
            run_git_sync("push", "--quiet", str(bare), "main", env=env, cwd=w).check()
            head = run_git_sync("rev-parse", "HEAD", env=env, cwd=w).check().stdout.strip()
        self.acl[path] = tokens
        return head

    async def handle(self, request: web.Request) -> web.StreamResponse:
        m = _PATH.match(request.path)
        if not m or m["repo"] not in self.acl:
            return web.Response(status=404, text="Repository not found.")
        token = None
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            token = base64.b64decode(auth[6:]).decode().partition(":")[2]
        elif auth.startswith(("token ", "Bearer ")):
            token = auth.split(" ", 1)[1]
        if token not in self.acl[m["repo"]]:
            return web.Response(status=404, text="Repository not found.")
        if m["endpoint"] == "git-upload-pack":
            self.upload_pack_posts.append(m["repo"])
        else:
            self.info_refs.append(m["repo"])
        return await serve_with_http_backend(
            request, self.root, f"/{m['repo']}.git/{m['endpoint']}", "u", self._backend
        )

    async def start(self) -> str:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{p:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()


def v2_fetch(*wants: str, extra: list[str] = ()) -> bytes:
    def pkt(s: str) -> bytes:
        return f"{len(s) + 5:04x}{s}\n".encode()

    body = pkt("command=fetch") + pkt("object-format=sha1") + b"0001"
    for w in wants:
        body += pkt(f"want {w}")
    for e in extra:
        body += pkt(e)
    return body + pkt("done") + b"0000"


def static_entry(id_: str, pattern: str, token: str) -> dict[str, Any]:
    return {"id": id_, "type": "oauth_token", "urlPattern": pattern, "token": token}
