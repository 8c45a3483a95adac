"""The S3 client's HTTP: aiobotocore's own aiohttp session, except that a redirect is never followed. Imported only
with mirror.snapshots (as aiobotocore itself is)."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiobotocore.httpsession import AIOHTTPSession


class StoreRedirected(Exception):
    """The store answered with a redirect: its failure, whatever the Location says."""


class NoRedirectSession(AIOHTTPSession):
    """aiohttp drops `Authorization` when a redirect changes host, but not `X-Amz-Security-Token` (an IRSA or pod
    identity session token) nor the other signed headers; and whatever the Location names would be read as the
    manifest or bundle. So a 3xx goes no further: botocore sees a failed request (retried, then an ObjectStoreError),
    and the restore falls back to upstream. S3 answers a wrong region with 301 and the region's name: the fix is
    `region` in the config, which the log line's error names."""

    async def _get_session(self, proxy_url: str | None) -> Any:
        return _NoRedirects(await super()._get_session(proxy_url))  # type: ignore[misc]


class _NoRedirects:
    """The one method of aiohttp.ClientSession that AIOHTTPSession.send calls, with redirects off."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def request(self, method: str, url: Any, **options: Any) -> aiohttp.ClientResponse:
        response = await self._session.request(method, url, allow_redirects=False, **options)
        if 300 <= response.status < 400:
            response.release()
            raise StoreRedirected(f"the object store answered HTTP {response.status}, a redirect: not followed")
        return response
