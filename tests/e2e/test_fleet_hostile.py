"""A hostile Redis writer: someone who can write to the fleet's shared Redis but lacks the Fernet key.

Every attack here is made with plain Redis commands against a real redis-server, as such a writer would make it:
values copied between keys, a lease that never ends, a value too large to read, a key of another type.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from proxy.credentials.redis_store import RedisStore
from proxy.metrics import Metrics
from proxy.testing import FakeGitHub
from proxy.testing.redis import RedisServer
from tests.e2e.test_fleet import fleet_config, stored_values
from tests.e2e.test_least_privilege import try_push
from tests.support import AcmeApp, Git, Replicas


def keys_of(redis: RedisServer) -> set[str]:
    return set(stored_values(redis))


def two_entries(fake: FakeGitHub, acme: AcmeApp, redis: RedisServer) -> dict[str, Any]:
    """ci-read may only read acme/private (its tokens ask for contents: read); release-bot may write anywhere."""
    config = fleet_config(fake, acme, redis)
    [release_bot] = config["github"]["appInstallation"]["auth"]
    ci_read = {**release_bot, "id": "ci-read", "urlPattern": r"(?<baseUrl>github\.com)/acme/private",
               "permissions": {"contents": "read"}}  # fmt: skip
    release_bot.update(id="release-bot", urlPattern=r"(?<baseUrl>github\.com)/.*")
    config["github"]["appInstallation"]["auth"] = [ci_read, release_bot]
    return config


async def test_values_copied_between_every_kind_of_key_are_misses_never_used(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The attacker tells the keys apart by which one appears after a request through a given entry, then moves
    sealed values around: a write token under a read-only entry's key, one owner's installation id under
    another's, a "not installed" answer under an installation id's key. Each arrangement is tried on a fresh
    replica (nothing cached locally), and everything still works as configured."""
    caplog.set_level(logging.INFO)
    fake_github.apps.add_installation(acme_app.app, "octo")
    fake_github.create_repo("octo/lib", {"name.txt": b"lib"})
    config = two_entries(fake_github, acme_app, redis_server)
    first = await replicas.start(config)
    learnt: list[set[str]] = []  # what the attacker sees appear after each request

    async def observe(*args: str, check: bool = True) -> None:
        before = keys_of(redis_server)
        await git(*args, check=check)
        learnt.append(keys_of(redis_server) - before)

    await observe("clone", "--quiet", f"{first}/github.com/acme/private", "r0")  # ci-read token, acme's id
    await observe("clone", "--quiet", f"{first}/github.com/acme/other", "o0")  # release-bot's token for acme
    await observe("clone", "--quiet", f"{first}/github.com/octo/lib", "l0")  # octo's id, release-bot's octo token
    await observe("clone", "--quiet", f"{first}/github.com/nobody/x", "n0", check=False)  # "not installed"
    assert [len(new) for new in learnt] == [2, 1, 2, 1]
    keys = sorted(set().union(*learnt))
    head_before = fake_github.head("acme/private")
    originals = {key: redis_server.command("GET", key).split(b"\r\n")[1].decode() for key in keys}

    for shift in range(1, len(keys)):  # every key gets every other key's value once
        for index, key in enumerate(keys):
            redis_server.command("SET", key, originals[keys[(index + shift) % len(keys)]], "PX", "600000")
        proxy = await replicas.start(config)  # a fresh replica: it reads what Redis holds
        clone = f"r{shift}"
        await git("clone", "--quiet", f"{proxy}/github.com/acme/private", clone)
        pushed = await try_push(git, git.workdir / clone)
        assert pushed.returncode != 0, f"ci-read pushed with a moved value (shift {shift})"
        await git("clone", "--quiet", f"{proxy}/github.com/acme/other", f"o{shift}")
        await git("clone", "--quiet", f"{proxy}/github.com/octo/lib", f"l{shift}")
        assert (git.workdir / f"l{shift}" / "name.txt").read_text() == "lib"
    # A token moved under an installation id's key (or back) does not even parse as a value of that kind; the
    # others open, and are refused for the identity they carry. Either is logged at most once per replica.
    misplaced = [r for r in caplog.records if "sealed for another key" in r.getMessage()]
    assert 1 <= len(misplaced) <= len(keys) - 1
    pushes = [seen for seen in fake_github.git_requests if "git-receive-pack" in seen.path + seen.query]
    assert pushes and all(seen.status == 403 for seen in pushes)  # GitHub's refusal of a read-only token
    assert fake_github.head("acme/private") == head_before


async def test_a_lease_without_a_deadline_is_taken_over_at_once(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    """The writer finds the lease key while a mint runs and sets it again for ever (no TTL), and another one with
    a TTL longer than any lease of ours. A cold replica does not wait on either: it takes the lease and mints."""
    config, lease = await _learn_the_lease_key(fake_github, acme_app, redis_server, git, replicas, "3s")  # 8 s leases
    for index, forever in enumerate((["SET", lease, "attacker"], ["SET", lease, "attacker", "EX", "86400"])):
        _forget_every_token(fake_github, redis_server)
        redis_server.command(*forever)
        proxy = await replicas.start(config)
        await git("clone", "--quiet", f"{proxy}/github.com/acme/private", f"cold-{index}")
        assert replicas.metric(index + 1, "git_token_proxy_lease_waits_total") == 0, "it waited on the lease"
        assert redis_server.command("GET", lease) == b"$-1\r\n"  # taken, used, and given back
    assert fake_github.apps.count("mint") == 3


async def test_waiters_that_give_up_on_a_stuck_holder_take_the_lease_and_mint_once(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    """A lease that looks like ours (a short TTL) but is renewed by the writer for ever: each waiting replica gives
    up after the lease's life, and the first to give up takes the lease, so that the fleet still mints once."""
    config, lease = await _learn_the_lease_key(fake_github, acme_app, redis_server, git, replicas, "2s")  # 7 s leases
    _forget_every_token(fake_github, redis_server)
    await _clone_twice_while_writing(redis_server, lease, lambda turn: "attacker", config, git, replicas)
    assert fake_github.apps.count("mint") == 2, "the waiters minted beside each other"  # the first clone's, and one
    assert replicas.metric(1, "git_token_proxy_lease_waits_total") == 1


async def test_a_writer_that_keeps_changing_the_holder_does_not_restart_the_wait(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    """Red team, round 4 again: a lease that looks like ours, set again every 0.2 s with a new holder value each
    time. Each new holder used to restart the waiters' clocks, so that they waited twice the lease's life. A
    writer that controls the key can always make replicas mint on their own (no value tells its holders apart);
    what holds is that the waiters take the lease past its life and clone, and mint no more than they would
    without a fleet. (The clock itself: test_lease_wait's unit tests, on a clock of their own.)"""
    config, lease = await _learn_the_lease_key(fake_github, acme_app, redis_server, git, replicas, "2s")  # 7 s leases
    _forget_every_token(fake_github, redis_server)
    await _clone_twice_while_writing(
        redis_server, lease, lambda turn: f"attacker-{turn:06}", config, git, replicas
    )  # fmt: skip
    assert fake_github.apps.count("mint") <= 3  # the first clone's, and at most one per replica


async def _clone_twice_while_writing(
    redis: RedisServer, lease: str, value: Callable[[int], str], config: dict[str, Any], git: Git,
    replicas: Replicas,
) -> None:  # fmt: skip
    """Two cold replicas clone while the writer sets the lease every 0.2 s (5 s TTL) to `value(turn)`, but only
    while it holds no replica's value (the key is absent, or holds one of the writer's)."""
    stop = asyncio.Event()

    async def write_for_ever() -> None:
        turn = 0
        while not stop.is_set():
            held = redis.command("GET", lease)
            if held == b"$-1\r\n" or b"attacker" in held:
                turn += 1
                redis.command("SET", lease, value(turn), "PX", "5000")
            await asyncio.sleep(0.2)

    writing = asyncio.create_task(write_for_ever())
    await asyncio.sleep(0.3)
    try:
        a, b = await replicas.start(config), await replicas.start(config)
        await asyncio.gather(
            git("clone", "--quiet", f"{a}/github.com/acme/private", "a"),
            git("clone", "--quiet", f"{b}/github.com/acme/other", "b"),
        )
    finally:
        stop.set()
        await writing


async def _learn_the_lease_key(
    fake: FakeGitHub, acme: AcmeApp, redis: RedisServer, git: Git, replicas: Replicas, http_timeout: str
) -> tuple[dict[str, Any], str]:
    """What the writer does first: watch Redis while a replica mints, and note the lease key that appears."""
    config = fleet_config(fake, acme, redis)
    config["github"]["appInstallation"]["httpClientTimeout"] = http_timeout  # a lease lives this + 5 s
    fake.apps.mint_latency = 0.2
    first = await replicas.start(config)
    cloning = asyncio.create_task(git("clone", "--quiet", f"{first}/github.com/acme/private", "first"))
    try:
        for _ in range(200):
            leases = [key for key in stored_values(redis) if ":lease:" in key]
            if leases:
                return config, leases[0]
            await asyncio.sleep(0.01)
        raise AssertionError("no lease seen while the mint ran")
    finally:
        await cloning
        fake.apps.mint_latency = 0


def _forget_every_token(fake: FakeGitHub, redis: RedisServer) -> None:
    """Tokens revoked and gone from Redis: the next cold replica must mint, and so take the lease."""
    fake.apps.revoke_all_tokens()
    for key in [k for k in stored_values(redis) if ":token:" in k]:
        redis.command("DEL", key)


async def test_an_oversized_value_is_refused_unread(redis_server: RedisServer) -> None:
    """256 MiB of garbage under a key of ours: the proxy reads at most 64 KiB of it, and it is a miss."""
    store = RedisStore(redis_server.url, "gtp", 1.0, Metrics())
    try:
        redis_server.command(
            "EVAL", "redis.call('SET', KEYS[1], string.rep('x', 256 * 1024 * 1024))", "1", "gtp:token:a"
        )
        sent_before = _net_output(redis_server)
        assert await store.get("token:a") is None
        assert _net_output(redis_server) - sent_before < 256 * 1024  # not the whole value
        assert store.available
    finally:
        await store.close()


async def test_a_key_of_another_type_is_a_miss_and_leaves_redis_in_use(redis_server: RedisServer) -> None:
    """A hash (or list) under a key of ours is an answer about that key, not a Redis failure: the breaker stays
    closed, so the writer cannot switch the fleet's sharing off with one HSET."""
    store = RedisStore(redis_server.url, "gtp", 1.0, Metrics())
    try:
        redis_server.command("HSET", "gtp:token:a", "field", "value")
        redis_server.command("RPUSH", "gtp:lease:b", "x")
        assert await store.get("token:a") is None
        assert store.available
        lease = await store.lease("lease:b", 5.0)
        assert lease.owner is not None  # a list is no lease of ours: replaced
        await store.put("token:c", b"value", 5.0)
        assert await store.get("token:c") == b"value"
    finally:
        await store.close()


def _net_output(redis: RedisServer) -> int:
    info = redis.command("INFO", "stats").decode()
    return int(info.split("total_net_output_bytes:")[1].split("\r\n")[0])
