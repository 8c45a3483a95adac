"""The exchange: one request in flight, as the data path fills it in and as the audit line reports it."""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..credentials import Credential, CredentialSource
from ..errors import AppNotInstalled
from ..routing import Route
from .context import ForwardContext, LiveContext
from .phases import Answer, Upload

if TYPE_CHECKING:
    from ..lfs import StorageAction

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(eq=False)  # identity: the transfer watch keys on it
class Exchange:
    """One request. It carries the request, the context it started with and, once routed, its route, so that
    each step of the data path takes the exchange and what is particular to that step."""

    request: web.Request
    live: LiveContext
    context: ForwardContext
    request_id: str
    started: float = field(default_factory=time.monotonic)
    route: Route | None = None
    client: str | None = None  # the access client's name
    identity: dict[str, str | None] | None = None  # a JWT client's: issuer, sub, jti, token fingerprint
    credential: Credential | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0  # counted per chunk: the transfer watch reads it to see whether the client still reads
    upload: Upload = Upload.ARRIVING
    answer: Answer = Answer.PENDING
    reason: str | None = None  # why the proxy refused the request
    aborted: str | None = None  # why a transfer already under way was cut
    cut_by: str | None = None  # who ended a transfer early: "client", "upstream" or "proxy" (a bug)
    mirror: str | None = None  # with a mirror, for pack requests: hit, filled or bypass
    upstream: aiohttp.ClientResponse | None = None  # once its headers have come
    lfs: StorageAction | None = None  # an /_lfs/ request: the object it moves
    fallback: AppNotInstalled | None = None  # the app is not installed: the read went upstream without a token
    credential_kind: str | None = None  # "anonymous" once such a read was answered
    push_refs: list[dict[str, str]] | None = None  # a push a policy checked: each ref update and its result

    @classmethod
    def of(cls, request: web.Request, live: LiveContext) -> Exchange:
        """A new exchange, with the request's own X-Request-Id when it is a sane one, so CI job ids flow through."""
        given = request.headers.get("X-Request-Id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)
        return cls(request, live, live.current, request_id)

    @property
    def routed(self) -> Route:
        """The route, for steps that only run once the request is routed."""
        assert self.route is not None, "a step of the data path ran before routing"
        return self.route

    @property
    def source(self) -> CredentialSource | None:
        """The route's credential source: None where no auth entry matches (an anonymous read)."""
        entry = self.routed.entry
        return self.context.sources[entry.id] if entry else None

    def count_in(self, size: int) -> None:
        self.bytes_in += size

    def cut(self, side: str) -> None:
        """The first side to break a transfer is the one that cut it (an abort that follows is its consequence)."""
        if self.cut_by is None:
            self.cut_by = side

    @property
    def cut_side(self) -> str | None:
        """Who cut the transfer; a request body that broke off is the client's doing."""
        return self.cut_by or ("client" if self.upload is Upload.BROKE else None)

    @property
    def complete(self) -> bool:
        return self.answer is Answer.DONE and self.cut_side is None

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    @contextlib.asynccontextmanager
    async def in_flight(self, streams_body: bool) -> AsyncIterator[None]:
        """While the exchange goes on: a body slot if its body is still arriving (taken first: waiting for one is
        the proxy's doing, and no client is judged for it; a body already here needs none), and the transfer
        watch."""
        slots = self.live.body_slots
        async with contextlib.AsyncExitStack() as stack:
            if slots is not None and streams_body and not self.request.content.is_eof():
                await stack.enter_async_context(slots.held(self.client))
            stack.enter_context(self.live.transfers.watching(self, self.request.transport, streams_body))
            yield
