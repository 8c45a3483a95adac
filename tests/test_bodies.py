"""Bodies the proxy reads before passing them on: what they hold in memory together is what the budget counts, and
never more than its limit (red team, round 4 again: bodies that stopped just past the limit gave their share back
while their heads stayed in memory for the whole exchange; 24 of them held 420 MiB against a 64 MiB budget)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.bodies import HeldBytes, Peeked, peek_body

LIMIT = 16 << 20  # the mirror's own bound on a pack request


async def test_heads_count_until_released_and_the_budget_is_never_exceeded() -> None:
    budget = HeldBytes(1 << 20)
    peeks: list[Peeked] = []
    seen_held: list[int] = []
    arrived = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        peeked = await peek_body(request, LIMIT, 0.5, budget, lambda size: seen_held.append(budget.held))
        peeks.append(peeked)
        if len(peeks) == 3:
            arrived.set()
        await asyncio.sleep(1)  # the exchange goes on; its head has not been sent yet
        return web.Response(text="ok")

    async def body(size: int) -> AsyncIterator[bytes]:
        yield b"x" * size
        await asyncio.sleep(3)  # then nothing for a while: the peek gives up on a whole body
        yield b"y"

    server = TestServer(_app(handler))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/"))
            posts = [asyncio.create_task(session.post(url, data=body(768 << 10))) for _ in range(3)]
            await asyncio.wait_for(arrived.wait(), 10)
            assert all(held <= budget.limit for held in seen_held), "read past the budget's room"
            assert not any(peeked.whole for peeked in peeks)
            # What the heads hold is what the budget counts, and it is within the limit.
            assert budget.held == sum(len(peeked.head) for peeked in peeks) <= budget.limit
            assert sum(len(peeked.head) for peeked in peeks) == budget.limit  # the room was used, no more
            for peeked in peeks:
                peeked.release()
            assert budget.held == 0 and all(peeked.head == b"" for peeked in peeks)
            for post in posts:
                (await post).release()
    finally:
        await server.close()


async def test_a_body_that_ends_as_the_room_runs_out_is_whole() -> None:
    budget = HeldBytes(1000)
    results: list[Peeked] = []

    async def handler(request: web.Request) -> web.Response:
        results.append(await peek_body(request, LIMIT, 5, budget, lambda size: None))
        return web.Response(text="ok")

    server = TestServer(_app(handler))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session, session.post(str(server.make_url("/")), data=b"z" * 1000):
            pass
    finally:
        await server.close()
    (peeked,) = results
    assert peeked.whole and peeked.head == b"z" * 1000 and budget.held == 1000


def _app(handler: object) -> web.Application:
    app = web.Application()
    app.router.add_post("/", handler)  # type: ignore[arg-type]
    return app
