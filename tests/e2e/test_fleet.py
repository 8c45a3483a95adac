"""Fleets: replicas share one token per installation through a real redis-server, in front of the fake GitHub.

Replicas are real `serve` processes where the test is about processes (one mint for a fleet, a lease holder that
dies), and in-process apps elsewhere: each has its own token cache, Redis client and single flight either way.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from proxy.config import parse_config
from proxy.testing import FakeGitHub
from proxy.testing.process import ServeProcess, kill_all
from proxy.testing.redis import RedisServer
from tests.support import AcmeApp, Git, Replicas, app_config

KEY = Fernet.generate_key().decode()
REPOS = ("private", "other", "third", "fourth")


def fleet_config(fake: FakeGitHub, acme: AcmeApp, redis: RedisServer, key: str = KEY, **entry: Any) -> dict[str, Any]:
    config = app_config(fake.url, acme, **entry)
    config["cache"] = {"redis": {"url": redis.url, "encryptionKey": key, "connectTimeout": "500ms"}}
    return config


def stored_values(redis: RedisServer) -> dict[str, bytes]:
    """Every key in Redis with its raw value, as a dump or MONITOR would show them."""
    listing = redis.command("KEYS", "*").decode(errors="replace")
    keys = [line for line in listing.split("\r\n") if line and line[0] not in "*$"]
    return {key: redis.command("GET", key) for key in keys}


def assert_no_token_in_clear(redis: RedisServer, fake: FakeGitHub) -> None:
    values = stored_values(redis)
    assert values, "nothing was shared"
    for key, value in values.items():
        for token in fake.apps.minted_tokens:
            assert token.encode() not in value and token not in key, f"a token in clear under {key}"
        assert b"x-access-token" not in value and b"ghs_" not in value


async def start_processes(tmp_path: Path, config: dict[str, Any], count: int) -> list[ServeProcess]:
    processes = []
    for index in range(count):
        folder = tmp_path / f"replica-{index}"
        folder.mkdir()
        process = ServeProcess(folder, config)
        await process.start()
        processes.append(process)
    return processes


async def test_three_replicas_and_24_cold_clones_mint_once_and_store_no_token_in_clear(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, tmp_path: Path
) -> None:
    processes = await start_processes(tmp_path, fleet_config(fake_github, acme_app, redis_server), 3)
    try:
        await asyncio.gather(
            *(
                git("clone", "--quiet", f"{processes[i % 3].url}/github.com/acme/{REPOS[i % 4]}", f"clone-{i}")
                for i in range(24)
            )
        )
    finally:
        await kill_all(processes)
    assert fake_github.apps.count("mint") == 1
    assert fake_github.apps.count("lookup") <= 3  # at most one per replica: look-ups take no lease
    for i in range(24):
        assert (git.workdir / f"clone-{i}" / "name.txt").read_text() == REPOS[i % 4]
    assert_no_token_in_clear(redis_server, fake_github)
    assert all(":token:" in key or ":kv:" in key for key in stored_values(redis_server))  # no lease left behind


async def test_a_warm_request_makes_no_redis_round_trip(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    proxy = await replicas.start(fleet_config(fake_github, acme_app, redis_server))
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "first")
    before = redis_server.commandstats()
    for i in range(5):
        await git("clone", "--quiet", f"{proxy}/github.com/acme/{REPOS[i % 4]}", f"warm-{i}")
    after = redis_server.commandstats()
    del before["info"], after["info"]  # our own
    assert before == after, "a warm request went to Redis"


async def test_healing_is_fleet_wide_one_heal_one_mint(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    config = fleet_config(fake_github, acme_app, redis_server)
    first, second = await replicas.start(config), await replicas.start(config)
    await git("clone", "--quiet", f"{first}/github.com/acme/private", "a")
    await git("clone", "--quiet", f"{second}/github.com/acme/other", "b")
    assert fake_github.apps.count("mint") == 1
    fake_github.apps.revoke_all_tokens()
    await git("clone", "--quiet", f"{first}/github.com/acme/private", "a2")  # heals: evicts in Redis, mints
    await git("clone", "--quiet", f"{second}/github.com/acme/other", "b2")  # finds the replacement in Redis
    assert fake_github.apps.count("mint") == 2


async def test_redis_going_away_and_coming_back(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Redis is an accelerator, never a dependency: while it is away every replica serves from its own cache and
    pays its timeout about once per breaker period, not per clone; when it is back, sharing resumes."""
    caplog.set_level(logging.INFO)
    config = fleet_config(fake_github, acme_app, redis_server)
    first = await replicas.start(config)
    await git("clone", "--quiet", f"{first}/github.com/acme/private", "before")
    redis_server.stop()
    late = await replicas.start(config)  # a cold replica while Redis is down: it must mint on its own
    for i in range(6):
        await git("clone", "--quiet", f"{late}/github.com/acme/{REPOS[i % 4]}", f"down-{i}")
        await git("clone", "--quiet", f"{first}/github.com/acme/{REPOS[i % 4]}", f"warm-{i}")
    assert fake_github.apps.count("mint") == 2  # one per replica, bounded
    assert replicas.metric(1, "git_token_proxy_redis_available") == 0
    assert replicas.metric(1, "git_token_proxy_shared_cache_errors_total") <= 3  # the breaker spares the clones
    unavailable = [r for r in caplog.records if "is unavailable" in r.getMessage()]
    assert len(unavailable) == 1, "one log line per change of state, not one per request"

    redis_server.start()  # empty, as after a restart
    await asyncio.sleep(5.5)  # past the breaker's pause
    fake_github.apps.add_installation(acme_app.app, "octo")
    fake_github.create_repo("octo/tool", {"name.txt": b"tool"})
    config_octo = fleet_config(fake_github, acme_app, redis_server, urlPattern=r"(?<baseUrl>github\.com)/.*")
    a, b = await replicas.start(config_octo), await replicas.start(config_octo)
    await git("clone", "--quiet", f"{a}/github.com/octo/tool", "octo-a")
    await git("clone", "--quiet", f"{b}/github.com/octo/tool", "octo-b")
    assert fake_github.apps.count("mint") == 3  # one for the octo installation, shared again
    assert replicas.metric(3, "git_token_proxy_redis_available") == 1


async def test_a_replica_with_another_key_does_not_crash_and_clones_work(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    ours = await replicas.start(fleet_config(fake_github, acme_app, redis_server))
    theirs = await replicas.start(fleet_config(fake_github, acme_app, redis_server, key=Fernet.generate_key().decode()))
    await git("clone", "--quiet", f"{ours}/github.com/acme/private", "ours")
    await git("clone", "--quiet", f"{theirs}/github.com/acme/private", "theirs")
    await git("clone", "--quiet", f"{theirs}/github.com/acme/other", "theirs-again")
    assert (git.workdir / "theirs" / "name.txt").read_text() == "private"
    assert fake_github.apps.count("mint") == 2  # the other key's replica could not read ours: it minted its own
    assert len([r for r in caplog.records if "does not decrypt" in r.getMessage()]) == 1


async def test_a_key_list_rotates_the_encryption_key(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    old, new = KEY, Fernet.generate_key().decode()
    before = await replicas.start(fleet_config(fake_github, acme_app, redis_server, key=old))
    await git("clone", "--quiet", f"{before}/github.com/acme/private", "old")
    config = fleet_config(fake_github, acme_app, redis_server)
    config["cache"]["redis"]["encryptionKey"] = [new, old]  # the new key seals, the old one still opens
    after = await replicas.start(config)
    await git("clone", "--quiet", f"{after}/github.com/acme/private", "new")
    assert fake_github.apps.count("mint") == 1


async def test_a_lease_holder_that_dies_mid_mint_lets_another_replica_mint(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, tmp_path: Path
) -> None:
    config = fleet_config(fake_github, acme_app, redis_server)
    config["github"]["appInstallation"]["httpClientTimeout"] = "2s"  # the lease lives 2 s + 5 s
    fake_github.apps.mint_latency = 1.5
    holder, survivor = await start_processes(tmp_path, config, 2)
    try:
        dying = asyncio.create_task(git("clone", "--quiet", f"{holder.url}/github.com/acme/private", "x", check=False))
        await holder.wait_for(lambda: bool(fake_github.apps.statuses("lookup")), "the holder to start its mint")
        await asyncio.sleep(0.3)  # the look-up is done; the mint is in flight
        assert holder.process is not None
        holder.process.kill()
        await holder.process.wait()
        await dying
        fake_github.apps.mint_latency = 0
        await git("clone", "--quiet", f"{survivor.url}/github.com/acme/private", "survivor")
    finally:
        await kill_all([holder, survivor])
    assert (git.workdir / "survivor" / "name.txt").read_text() == "private"
    assert not [key for key in stored_values(redis_server) if ":lease:" in key]  # released, or expired


async def test_a_failed_mint_leaves_nothing_in_redis(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, replicas: Replicas
) -> None:
    proxy = await replicas.start(fleet_config(fake_github, acme_app, redis_server))
    fake_github.apps.fail_next_mints(1, status=422)  # not retried: GitHub refuses
    failed = await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "failed", check=False)
    assert failed.returncode != 0
    assert not [key for key in stored_values(redis_server) if ":token:" in key or ":lease:" in key]
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "works")  # and nothing was remembered


async def test_check_round_trips_a_probe_through_redis_or_says_why_not(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.check import run_check

    config = parse_config(fleet_config(fake_github, acme_app, redis_server))
    assert await run_check(config, "config.yaml", None) == 0
    out = capsys.readouterr().out
    assert f"shared cache: Redis at 127.0.0.1:{redis_server.port}/0: OK" in out
    assert not [key for key in stored_values(redis_server) if ":check:" in key]  # the probe cleans up
    redis_server.stop()
    assert await run_check(config, "config.yaml", None) == 1
    assert "shared cache: Redis at" in (out := capsys.readouterr().out) and "FAILED: ConnectionError" in out


async def test_one_replica_with_redis_looks_an_owner_up_once(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer
) -> None:
    """The stores are read before the look-up's single flight, and with Redis that read awaits: a flight that
    ends meanwhile must be noticed, not followed by a second look-up. Cold requests arrive 0.5 ms apart."""
    from proxy.app import build_api_session, build_credentials
    from proxy.metrics import Metrics
    from proxy.routing import RepoRef

    config = parse_config(fleet_config(fake_github, acme_app, redis_server))
    async with build_api_session(config) as session:
        credentials = await build_credentials(config, Metrics(), session)
        assert credentials.shared is not None
        source = credentials.sources["acme-app"]

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.0005)
            await source.get_credential(RepoRef("github.com", "acme", REPOS[i % 4]))

        try:
            await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await credentials.close()
    assert (fake_github.apps.count("lookup"), fake_github.apps.count("mint")) == (1, 1)


async def test_a_replica_that_stops_revokes_nothing_the_fleet_shares(
    fake_github: FakeGitHub, acme_app: AcmeApp, redis_server: RedisServer, git: Git, tmp_path: Path
) -> None:
    """revokeOnShutdown defaults to false with cache.redis: the other replicas go on with the shared token."""
    first, second = await start_processes(tmp_path, fleet_config(fake_github, acme_app, redis_server), 2)
    try:
        await git("clone", "--quiet", f"{first.url}/github.com/acme/private", "a")
        assert await first.stop() == 0
        await git("clone", "--quiet", f"{second.url}/github.com/acme/other", "b")
    finally:
        await kill_all([first, second])
    assert fake_github.apps.count("mint") == 1
    assert not [call for call in fake_github.apps.calls if call.path == "/installation/token"]
