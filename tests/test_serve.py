"""Serve's reloads and background loops: one reload at a time, none blocks, a failing round never ends a loop, and a
failure is logged once, not every round."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest
import yaml

from proxy.app import PROXY, create_app
from proxy.config import load_config
from proxy.logs import Redactor
from proxy.serve import ConfigWatcher, Reloader, keep_running, reload_config
from proxy.testing import FakeGitHub
from tests.support import AcmeApp, app_config
from tests.test_config import alias_bomb


async def test_keep_running_outlives_any_failure_and_logs_each_once(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[BaseException | None] = [
        OSError("disk gone"), OSError("disk gone"), OSError("disk gone"),  # one failure, repeated: logged once
        MemoryError(),  # a different failure: logged
        None,  # a good round
        OSError("disk gone"),  # the first failure again, after a success: logged again
        None,
    ]  # fmt: skip
    rounds = 0
    finished = asyncio.Event()

    async def poll() -> None:
        nonlocal rounds
        outcome = outcomes[rounds]
        rounds += 1
        if rounds == len(outcomes):
            finished.set()
            await asyncio.Event().wait()  # park here until cancelled
        if outcome is not None:
            raise outcome

    caplog.set_level(logging.ERROR, "git_token_proxy.serve")
    loop = asyncio.create_task(keep_running(poll, 0, "test poller"))
    await asyncio.wait_for(finished.wait(), 5)
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    logged = [record for record in caplog.records if "test poller failed" in record.getMessage()]
    assert [record.exc_info[0] if record.exc_info else None for record in logged] == [OSError, MemoryError, OSError]


async def test_sighups_during_a_reload_run_one_more_reload_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("upstreams:\n  - host: github.com\n")
    app = await create_app(load_config(path))
    reloader = Reloader(app[PROXY], path, Redactor())
    caplog.set_level(logging.INFO, "git_token_proxy")
    try:
        reloader.request()  # SIGHUP
        await asyncio.sleep(0)  # its reload starts, and is now reading the file in a thread
        reloader.request()  # SIGHUP during it: one more after it
        reloader.request()  # and again: that one is already due, and will read the newest file
        await asyncio.sleep(0)  # the second one queues for the lock
        await reloader.reload()  # the lock is fair: this one runs last
    finally:
        await app[PROXY].close()
    reloads = [record for record in caplog.records if "configuration reloaded" in record.getMessage()]
    assert len(reloads) == 3


async def test_an_unloadable_config_is_rejected_and_the_running_one_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("upstreams:\n  - host: github.com\n")
    app = await create_app(load_config(path))
    proxy = app[PROXY]
    running = proxy.config
    path.write_text(alias_bomb(9))
    try:
        assert await reload_config(proxy, path, Redactor()) is False
    finally:
        await proxy.close()
    assert proxy.config is running
    assert any("reload rejected" in r.getMessage() and "alias bomb" in r.getMessage() for r in caplog.records)


async def test_a_key_file_missing_at_start_up_then_rotated_in_is_a_change(
    fake_github: FakeGitHub, acme_app: AcmeApp, tmp_path: Path
) -> None:
    """A Secret mid-swap while the watcher takes stock: the key that then appears is reloaded, not taken for the
    starting state (the old key would stay in use for good)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(app_config(fake_github.url, acme_app)))
    app = await create_app(load_config(config_file))
    proxy = app[PROXY]
    rotated = acme_app.key_file.read_text()
    acme_app.key_file.unlink()
    watcher = await ConfigWatcher.taking_stock(proxy, config_file, Reloader(proxy, config_file, Redactor()))
    acme_app.key_file.write_text(rotated)
    before = proxy.live.current
    await watcher.poll()
    assert proxy.live.current is not before  # reloaded
    await proxy.close()
