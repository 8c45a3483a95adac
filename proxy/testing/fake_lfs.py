"""A GitHub-like LFS for tests: the batch API on the git host, the objects on a separate storage host that wants a
signed href and a `RemoteAuth` header, as github-cloud.githubusercontent.com does."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_CHUNK = 256 * 1024


@dataclass
class FakeLfs:
    """`href_host` is the storage host the batch answer names: by default one no client can resolve, so only a
    proxy that maps it (lfs.storageHosts[].url) to `storage_url` can reach the objects."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fake-lfs-")))
    href_host: str = "lfs-storage.invalid"
    href_scheme: str = "https"
    expires_in: int = 3600
    expires_at: str | None = None  # given: put in every action (an RFC 3339 time)
    corrupt: set[str] = field(default_factory=set)  # oids served with one byte flipped
    action_headers: dict[str, str] = field(default_factory=dict)  # added to every action's `header` (a hostile API)
    storage_url: str = ""
    remote_auth: str = field(default_factory=lambda: "remote-" + secrets.token_urlsafe(24))
    storage_requests: list[tuple[str, str]] = field(default_factory=list)  # (method, oid) that reached storage
    refused: int = 0  # storage requests without a valid signature or header
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ set-up and queries

    def object_path(self, oid: str) -> Path:
        return self.root / "objects" / oid

    def has(self, oid: str) -> bool:
        return self.object_path(oid).is_file()

    def add_object(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        self.object_path(oid).write_bytes(data)
        return oid

    @property
    def secrets(self) -> list[str]:
        """What must never reach a client or a log: the credential header's value."""
        return [self.remote_auth]

    # ------------------------------------------------------------ the batch API (served by FakeGitHub)

    async def batch_answer(self, request: web.Request, full_name: str) -> web.Response:
        body = json.loads(await request.read())
        operation = body.get("operation")
        objects = []
        for item in body.get("objects", []):
            oid, size = str(item.get("oid")), int(item.get("size", 0))
            entry: dict[str, object] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "download":
                if self.has(oid):
                    entry["actions"] = {"download": self._action("GET", full_name, oid)}
                else:
                    entry["error"] = {"code": 404, "message": "Object does not exist"}
            elif not self.has(oid):
                entry["actions"] = {
                    "upload": self._action("PUT", full_name, oid),
                    "verify": self._action("POST", full_name, oid, verify=True),
                }
            objects.append(entry)
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return web.json_response(answer, content_type="application/vnd.git-lfs+json")

    def _action(self, method: str, full_name: str, oid: str, verify: bool = False) -> dict[str, object]:
        path = f"/alambic/{full_name}/{oid}" + ("/verify" if verify else "")
        expires = int(time.time()) + self.expires_in
        signature = self._sign(method, path, expires)
        href = f"{self.href_scheme}://{self.href_host}{path}?X-Expires={expires}&X-Signature={signature}"
        header = {"Authorization": f"RemoteAuth {self.remote_auth}", **self.action_headers}
        action: dict[str, object] = {"href": href, "header": header, "expires_in": self.expires_in}
        if self.expires_at is not None:
            action["expires_at"] = self.expires_at
        return action

    def _sign(self, method: str, path: str, expires: int) -> str:
        return hmac.new(self._key, f"{method} {path} {expires}".encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------ the storage host

    async def start(self, host: str = "127.0.0.1") -> str:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/alambic/{owner}/{repo}/{oid}", self._serve)
        app.router.add_route("POST", "/alambic/{owner}/{repo}/{oid}/verify", self._verify)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, 0).start()
        self.storage_url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.storage_url

    async def close(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    def _authorized(self, request: web.Request) -> bool:
        try:
            expires = int(request.query.get("X-Expires", ""))
        except ValueError:
            return False
        signature = self._sign(request.method, request.path, expires)
        good = (
            hmac.compare_digest(signature, request.query.get("X-Signature", ""))
            and expires > time.time()
            and hmac.compare_digest(request.headers.get("Authorization", ""), f"RemoteAuth {self.remote_auth}")
        )
        if not good:
            self.refused += 1
        return good

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=403, text="<Error><Code>SignatureDoesNotMatch</Code></Error>")
        oid = request.match_info["oid"]
        self.storage_requests.append((request.method, oid))
        if request.method == "PUT":
            return await self._store(request, oid)
        if request.method != "GET" or not self.has(oid):
            return web.Response(status=404, text="no such object")
        path = self.object_path(oid)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = path.stat().st_size
        await response.prepare(request)
        with path.open("rb") as source:
            first = True
            while chunk := source.read(_CHUNK):
                if first and oid in self.corrupt:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                first = False
                await response.write(chunk)
        await response.write_eof()
        return response

    async def _store(self, request: web.Request, oid: str) -> web.Response:
        """Streamed to disk and checked, as S3 would with a signed Content-SHA256."""
        if request.content_length is None:
            return web.Response(status=411, text="Content-Length required")
        partial = self.root / f"upload-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        with partial.open("wb") as sink:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                sink.write(chunk)
        if digest.hexdigest() != oid or partial.stat().st_size != request.content_length:
            partial.unlink()
            return web.Response(status=400, text="content does not match its oid")
        partial.rename(self.object_path(oid))
        return web.Response(status=200)

    async def _verify(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=403, text="<Error><Code>SignatureDoesNotMatch</Code></Error>")
        oid = request.match_info["oid"]
        self.storage_requests.append(("VERIFY", oid))
        body = json.loads(await request.read())
        if not self.has(oid) or self.object_path(oid).stat().st_size != body.get("size"):
            return web.Response(status=404, text="not stored")
        return web.Response(status=200)
