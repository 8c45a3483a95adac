"""The transfer watch: cuts a transfer whose client went quiet, or drips its body, so that no client holds an
upstream connection for ever; and the body slots, so that slow bodies cannot take the whole upstream pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ProxyBusy
from ..metrics import Metrics
from .phases import Answer, Upload

log = logging.getLogger("git_token_proxy.forward")


class Watched(Protocol):
    """What the watch reads of a request in flight (an `Exchange`), and the one thing it may do: cut it."""

    request_id: str
    bytes_in: int
    bytes_out: int
    upload: Upload
    answer: Answer
    aborted: str | None

    def cut(self, side: str) -> None: ...

    def close_upstream(self) -> None: ...


@dataclass(eq=False)
class _Watch:
    exchange: Watched
    transport: asyncio.Transport
    streams_body: bool  # the client sends a body that the proxy streams (rather than one already read)
    seen: tuple[int, int] = (-1, -1)  # bytes in, bytes out at the last sweep
    progress_at: float = field(default_factory=time.monotonic)
    # (what is judged, since, its bytes then): a rate is judged over this window, the body's or the answer's
    window: tuple[str, float, int] = ("", -1.0, 0)


BODY_RATE_WINDOW = 30.0


class TransferWatch:
    """Cuts transfers whose client went quiet: one that stops sending its request body, or stops reading its
    answer, while keeping the connection open. Either would otherwise hold an upstream connection (of a capped
    pool) for ever. Nothing is done per chunk but the byte counts the audit line needs anyway: a periodic sweep
    compares them, so a fast clone pays no timer."""

    def __init__(
        self, write_timeout: float, metrics: Metrics, min_body_rate: float = 0.0, min_answer_rate: float = 0.0
    ) -> None:
        self.write_timeout = write_timeout
        self.min_body_rate = min_body_rate  # bytes/s a request body must average while it arrives (0: no floor)
        self.min_answer_rate = min_answer_rate  # bytes/s a client must read while it holds an answer up (0: none)
        self._metrics = metrics
        self._active: dict[Watched, _Watch] = {}

    @property
    def rate_window(self) -> float:
        """The span a body's rate is judged over: long enough for a pause, short enough that a client dripping a
        byte now and then (never quiet for writeTimeout) lets go of its upstream connection within it."""
        return min(BODY_RATE_WINDOW, self.write_timeout)

    @property
    def sweep_interval(self) -> float:
        return max(0.05, min(self.write_timeout / 4, 15.0))

    @contextlib.contextmanager
    def watching(self, exchange: Watched, transport: asyncio.Transport | None, streams_body: bool) -> Iterator[None]:
        if transport is not None:
            self._active[exchange] = _Watch(exchange, transport, streams_body)
        try:
            yield
        finally:
            self._active.pop(exchange, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                self.sweep(time.monotonic())
            except Exception:  # the watch must outlive any bug in one sweep
                log.exception("transfer watch: sweep failed")

    def sweep(self, now: float) -> None:
        for watch in list(self._active.values()):
            exchange = watch.exchange
            counts = (exchange.bytes_in, exchange.bytes_out)
            slow = self._too_slow(watch, now)
            if slow:
                self._cut(watch, slow)
            elif counts != watch.seen or not self._client_holds_it_up(watch):
                watch.seen, watch.progress_at = counts, now
            elif now - watch.progress_at >= self.write_timeout:
                self._cut(watch, f"the client went quiet for {self.write_timeout:.0f} s (server.writeTimeout)")

    def _too_slow(self, watch: _Watch, now: float) -> str | None:
        """Why the transfer is cut, when its client is too slow: a body arriving slower than minBodyRate, or an
        answer the client holds up (bytes wait for it) while reading slower than minAnswerRate. Either would
        hold an upstream connection of a capped pool for as long as the client likes, never quiet for
        writeTimeout. Judged window by window, each on its own counter."""
        exchange = watch.exchange
        if (
            self.min_body_rate
            and watch.streams_body
            and exchange.upload is Upload.ARRIVING
            and (exchange.answer is Answer.PENDING)
        ):
            judged, rate, setting, count = "body", self.min_body_rate, "server.minBodyRate", exchange.bytes_in
            what = "the request body arrived"
        elif self.min_answer_rate and exchange.answer is Answer.STREAMING and self._client_holds_it_up(watch):
            judged, rate, setting, count = "answer", self.min_answer_rate, "server.minAnswerRate", exchange.bytes_out
            what = "the client read the answer"
        else:
            watch.window = ("", -1.0, 0)
            return None
        was, since, bytes_then = watch.window
        if was != judged or since < 0:
            watch.window = (judged, now, count)
            return None
        if now - since < self.rate_window:
            return None
        watch.window = (judged, now, count)
        if (count - bytes_then) / (now - since) >= rate:
            return None
        return f"{what} slower than {rate:.0f} bytes/s over {self.rate_window:.0f} s ({setting})"

    @staticmethod
    def _client_holds_it_up(watch: _Watch) -> bool:
        """Before the answer: the client owes body bytes. During it: bytes wait for the client to read them.
        Otherwise it is upstream (or the mirror's fill) that is slow, and its own timeouts are the judge."""
        if watch.exchange.answer is not Answer.PENDING:
            return watch.transport.get_write_buffer_size() > 0
        return watch.streams_body and watch.exchange.upload is Upload.ARRIVING

    def _cut(self, watch: _Watch, why: str) -> None:
        exchange = watch.exchange
        self._active.pop(exchange, None)
        exchange.aborted = why
        exchange.cut("client")
        log.warning(
            "request %s: aborting the transfer after %d bytes in, %d out: %s",
            exchange.request_id, exchange.bytes_in, exchange.bytes_out, exchange.aborted,
        )  # fmt: skip
        self._metrics.write_stalls.inc()
        exchange.close_upstream()  # never back to the pool: the exchange did not complete
        watch.transport.abort()


# A request whose body is still arriving waits this long for a body slot, then gets a 503 with the reason: never a
# push left hanging without a word.
BODY_SLOT_WAIT = 30.0


class BodySlots:
    """Upstream connections that requests with a body still arriving may hold at once: the rest of the pool stays
    for everyone else (an info/refs, a body already here), so that slow pushes cannot starve every clone. With
    access control on, one client's bodies take at most half of them."""

    def __init__(self, slots: int) -> None:
        self._all = asyncio.Semaphore(slots)
        self._per_client = max(1, slots // 2)
        self._clients: dict[str, asyncio.Semaphore] = {}  # by access client: as many as the config names

    @contextlib.asynccontextmanager
    async def held(self, client: str | None) -> AsyncIterator[None]:
        """ProxyBusy when none comes free within BODY_SLOT_WAIT."""
        async with contextlib.AsyncExitStack() as held:
            for semaphore in [self._all] if client is None else [self._client(client), self._all]:
                try:
                    async with asyncio.timeout(BODY_SLOT_WAIT):
                        await semaphore.acquire()
                except TimeoutError:
                    raise ProxyBusy(
                        "every upstream connection for request bodies still arriving is taken "
                        f"(server.maxUpstreamConnections) after {BODY_SLOT_WAIT:.0f} s; try again"
                    ) from None
                held.callback(semaphore.release)
            yield

    def _client(self, client: str) -> asyncio.Semaphore:
        if client not in self._clients:
            self._clients[client] = asyncio.Semaphore(self._per_client)
        return self._clients[client]
