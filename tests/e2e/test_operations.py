"""Operations, against `git-token-proxy serve` in its own process: drain on SIGTERM, reload on SIGHUP and on change
(and refuse, without stalling, what must not be loaded), JSON logs with request ids and no secrets."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.testing import FakeGitHub, pkcs1_pem
from proxy.testing.process import free_port
from tests.support import AcmeApp, Git, app_config
from tests.test_config import alias_bomb


def pack_requested(fake: FakeGitHub) -> bool:
    """Protocol v2 POSTs twice: ls-refs, then the fetch whose answer is the pack. Only the second is a transfer."""
    return sum(1 for seen in fake.seen if seen.path.endswith("git-upload-pack")) >= 2


def install_on_octo(fake: FakeGitHub, acme: AcmeApp) -> None:
    """The same app, installed on a second org with one repo: what a reload adds an entry for."""
    fake.apps.add_installation(acme.app, "octo")
    fake.create_repo("octo/tool", {"name.txt": b"tool"})


def with_octo_entry(config: dict[str, Any], acme: AcmeApp) -> dict[str, Any]:
    entries = config["github"]["appInstallation"]["auth"]
    entries.append({**entries[0], "id": "octo-app", "urlPattern": r"(?<baseUrl>github\.com)/octo/.*"})
    return config


async def test_sigterm_lets_a_large_clone_finish_and_exits_zero(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    files = {f"blob-{i:02}.bin": os.urandom(2 * 1024 * 1024) for i in range(26)}  # 52 MiB, incompressible
    fake_github.create_repo("acme/big", {**files, "name.txt": b"big"})
    fake_github.git_bytes_per_second = 20 * 1024 * 1024  # about 2.5 s of transfer
    metrics_port = free_port()
    config = app_config(fake_github.url, acme_app)
    config["server"] = {"metricsPort": metrics_port, "shutdownGrace": "20s"}
    proxy = await serve_process(config, "--log-format", "json")

    clone = asyncio.create_task(git("clone", "--quiet", "--bare", f"{proxy.url}/github.com/acme/big", "big.git"))
    await proxy.wait_for(lambda: pack_requested(fake_github), "the pack")
    await asyncio.sleep(0.3)
    await proxy.signal(signal.SIGTERM)
    signalled = time.monotonic()

    async with aiohttp.ClientSession() as session:
        statuses = []
        while not clone.done():
            try:
                async with session.get(f"http://127.0.0.1:{metrics_port}/readyz") as response:
                    statuses.append(response.status)
            except aiohttp.ClientError:
                statuses.append(0)  # the ops site closes once the transfer is out, while git still indexes
            await asyncio.sleep(0.1)
    assert 503 in statuses  # draining shows on the ops port while the transfer goes on
    await clone  # the clone completed
    count = await git("count-objects", "-v", cwd=git.workdir / "big.git")
    assert "size-pack: 5" in count.stdout  # ~52 MiB of pack arrived
    assert await proxy.stop() == 0
    assert time.monotonic() - signalled < 20
    assert "stopping: no new connections" in proxy.stderr


async def test_sighup_reloads_atomically_and_keeps_unchanged_tokens(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    install_on_octo(fake_github, acme_app)
    config = app_config(fake_github.url, acme_app)
    proxy = await serve_process(config)

    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "before")
    refused = await git("clone", f"{proxy.url}/github.com/octo/tool", "refused", check=False)
    assert refused.returncode != 0 and "no auth entry" in refused.stderr

    proxy.write_config(with_octo_entry(config, acme_app))
    await proxy.signal(signal.SIGHUP)
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the reload")
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "octo")  # the new entry, no restart
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "after")
    assert fake_github.apps.count("mint") == 2  # one for octo; acme's token survived the reload

    proxy.write_config("github: [this is not: a valid config\n")
    await proxy.signal(signal.SIGHUP)
    await proxy.wait_for(lambda: "reload rejected" in proxy.stderr, "the rejection")
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "still")  # the old config still serves
    assert await proxy.stop() == 0

    lines = proxy.log_lines()  # every line is JSON (this would raise otherwise)
    audit = [line for line in lines if "status" in line and "repo" in line]
    assert audit and all(line["request_id"] for line in audit)
    assert any(line.get("level") == "ERROR" and "reload rejected" in line["message"] for line in lines)
    for token in fake_github.apps.minted_tokens:
        assert token not in proxy.stderr


async def test_watch_reloads_when_the_file_changes(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    install_on_octo(fake_github, acme_app)
    config = app_config(fake_github.url, acme_app)
    proxy = await serve_process(config, "--watch")
    proxy.write_config(with_octo_entry(config, acme_app))
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the watcher", seconds=15)
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "octo")
    assert await proxy.stop() == 0


async def test_request_ids_come_back_and_reach_the_logs(
    fake_github: FakeGitHub, acme_app: AcmeApp, serve_process: Any
) -> None:
    proxy = await serve_process(app_config(fake_github.url, acme_app))
    async with aiohttp.ClientSession() as session:
        target = f"{proxy.url}/github.com/acme/private.git/info/refs?service=git-upload-pack"
        async with session.get(target, headers={"X-Request-Id": "ci-job-42"}) as given:
            assert given.headers["X-Request-Id"] == "ci-job-42"
        async with session.get(target) as generated:
            generated_id = generated.headers["X-Request-Id"]
    assert await proxy.stop() == 0
    lines = proxy.log_lines()
    ids = {line.get("request_id") for line in lines}
    assert {"ci-job-42", generated_id} <= ids
    minted = [line for line in lines if "minted a token" in line.get("message", "")]
    assert minted and minted[0]["request_id"] == "ci-job-42"  # the mint's log line belongs to the request


async def test_watch_notices_a_rotated_key_file(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    from proxy.testing import pkcs8_pem

    proxy = await serve_process(app_config(fake_github.url, acme_app), "--watch")
    acme_app.key_file.write_text(pkcs8_pem(acme_app.key))  # the Secret rotated (here: same key, new encoding)
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the watcher", seconds=15)
    assert "1 kept with their caches" in proxy.stderr  # same key fingerprint: the source and its token stay
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "out")
    assert await proxy.stop() == 0


async def test_a_second_signal_cuts_the_drain_short(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    fake_github.create_repo("acme/big", {f"b{i}.bin": os.urandom(2 * 1024 * 1024) for i in range(8)})
    fake_github.git_bytes_per_second = 1024 * 1024  # 16 s of transfer: longer than this test waits
    config = app_config(fake_github.url, acme_app)
    config["server"] = {"shutdownGrace": "60s"}
    proxy = await serve_process(config)
    clone = asyncio.create_task(git("clone", "--bare", f"{proxy.url}/github.com/acme/big", "big.git", check=False))
    await proxy.wait_for(lambda: pack_requested(fake_github), "the pack")
    await proxy.signal(signal.SIGTERM)
    await proxy.wait_for(lambda: "stopping" in proxy.stderr, "the drain to start")
    await proxy.signal(signal.SIGINT)
    assert await proxy.stop() == 1
    assert "stopped by a second signal" in proxy.stderr
    assert (await clone).returncode != 0


def replace_with(path: Path, kind: str) -> None:
    """Atomically put a FIFO (no writer: opening it for reading blocks) or a link to /dev/zero where `path` was."""
    replacement = path.with_suffix(".new")
    if kind == "fifo":
        os.mkfifo(replacement)
    else:
        replacement.symlink_to("/dev/zero")
    os.replace(replacement, path)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
async def test_watch_survives_a_key_file_replaced_by_a_fifo_or_dev_zero(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any, kind: str
) -> None:
    install_on_octo(fake_github, acme_app)
    config = app_config(fake_github.url, acme_app)
    proxy = await serve_process(config, "--watch")

    replace_with(acme_app.key_file, kind)
    await proxy.keeps_answering_until(lambda: "reload rejected" in proxy.stderr, "the rejection")
    assert "acme-app" in next(line for line in proxy.stderr.splitlines() if "reload rejected" in line)
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "still")  # the running config serves

    restored = acme_app.key_file.with_suffix(".new")
    restored.write_text(pkcs1_pem(acme_app.key))
    os.replace(restored, acme_app.key_file)
    proxy.write_config(with_octo_entry(config, acme_app))  # a later good edit is still picked up
    await proxy.wait_for(lambda: "configuration reloaded: 2 auth entries" in proxy.stderr, "the good edit")
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "octo")
    assert proxy.stderr.count("reload rejected") == 1  # the watcher polled on, but said it once
    assert await proxy.stop() == 0
    assert "Traceback" not in proxy.stderr


@pytest.mark.parametrize("trigger", ["--watch", "SIGHUP"])
async def test_a_yaml_bomb_is_rejected_without_stalling_and_the_old_config_serves(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any, trigger: str
) -> None:
    install_on_octo(fake_github, acme_app)
    config = app_config(fake_github.url, acme_app)
    proxy = await serve_process(config, *([trigger] if trigger == "--watch" else []))

    proxy.write_config(alias_bomb(7))  # ~340 bytes, 4.8 million strings once expanded
    if trigger == "SIGHUP":
        await proxy.signal(signal.SIGHUP)
    await proxy.keeps_answering_until(lambda: "reload rejected" in proxy.stderr, "the rejection")
    assert "alias bomb" in proxy.stderr
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "still")

    proxy.write_config(with_octo_entry(config, acme_app))
    if trigger == "SIGHUP":
        await proxy.signal(signal.SIGHUP)
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the good edit")
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "octo")
    assert await proxy.stop() == 0


async def test_watch_reloads_when_the_key_file_a_rejected_config_names_appears(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any, tmp_path: Path
) -> None:
    """ConfigMaps and Secrets are updated separately: the config naming a new key file may land first. Its reload
    is rejected; when the key lands, the watcher must notice, although only the rejected config names it."""
    install_on_octo(fake_github, acme_app)
    config = app_config(fake_github.url, acme_app)
    proxy = await serve_process(config, "--watch", "--log-format", "json")
    late_key = tmp_path / "mounted-later" / "octo.pem"
    new_config = with_octo_entry(app_config(fake_github.url, acme_app), acme_app)
    new_config["github"]["appInstallation"]["auth"][1]["privateKey"] = str(late_key)
    proxy.write_config(new_config)
    await proxy.wait_for(lambda: "reload rejected" in proxy.stderr, "the rejected reload", seconds=15)
    late_key.parent.mkdir()
    late_key.write_text(pkcs1_pem(acme_app.key))
    await proxy.wait_for(lambda: "configuration reloaded" in proxy.stderr, "the reload once the key exists", 15)
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "tool")
    assert proxy.stderr.count("reload rejected") == 1


async def test_drain_delay_keeps_accepting_and_says_draining_on_the_git_port(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    config = app_config(fake_github.url, acme_app)
    config["server"] = {"metricsPort": free_port(), "drainDelay": "3s"}
    proxy = await serve_process(config)
    await proxy.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/readyz") as response:
        assert (response.status, await response.text()) == (503, "draining: finishing transfers before shutdown\n")
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "during-the-delay")  # still accepted
    assert await proxy.stop() == 0


def revocations(fake: FakeGitHub) -> list[int]:
    return [call.status for call in fake.apps.calls if call.method == "DELETE" and call.path == "/installation/token"]


async def test_shutdown_revokes_the_tokens_this_process_minted(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    """GitHub's advice: revoke installation tokens no longer needed. After the drain, so that transfers finish with
    them; one DELETE per token, however many entries share it."""
    install_on_octo(fake_github, acme_app)
    proxy = await serve_process(with_octo_entry(app_config(fake_github.url, acme_app), acme_app))
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "acme")
    await git("clone", "--quiet", f"{proxy.url}/github.com/octo/tool", "octo")
    minted = list(fake_github.apps.minted_tokens)
    assert len(minted) == 2
    assert await proxy.stop() == 0
    assert revocations(fake_github) == [204, 204]
    assert not set(minted) & set(fake_github.apps.grants)  # GitHub no longer honours them
    assert "revoked 2 of 2 installation tokens on shutdown" in proxy.stderr


async def test_shutdown_revokes_nothing_when_told_not_to(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    config = app_config(fake_github.url, acme_app, {"revokeOnShutdown": False})
    proxy = await serve_process(config)
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "acme")
    assert await proxy.stop() == 0
    assert revocations(fake_github) == []


async def test_a_clone_killed_halfway_is_audited_as_cut_by_the_client(
    fake_github: FakeGitHub, acme_app: AcmeApp, git: Git, serve_process: Any
) -> None:
    """Issue 19, item 5: a cut transfer was audited as a finished 200. Every line now says `complete`, and a cut
    one which side cut it; git_token_proxy_transfers_cut_total counts them."""
    files = {f"blob-{i:02}.bin": os.urandom(2 * 1024 * 1024) for i in range(8)}  # 16 MiB, incompressible
    fake_github.create_repo("acme/big", {**files, "name.txt": b"big"})
    fake_github.git_bytes_per_second = 4 * 1024 * 1024  # about 4 s of transfer
    proxy = await serve_process(app_config(fake_github.url, acme_app), "--log-format", "json")
    await git("clone", "--quiet", f"{proxy.url}/github.com/acme/private", "whole")
    killed = await asyncio.create_subprocess_exec(
        "git", "clone", "--quiet", f"{proxy.url}/github.com/acme/big", str(git.workdir / "big"), env=git.env,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proxy.wait_for(lambda: pack_requested(fake_github), "the pack")
    await asyncio.sleep(1.0)  # a part of the pack is through
    killed.kill()
    await killed.wait()

    def audit() -> list[dict[str, Any]]:
        return [line for line in proxy.log_lines() if "complete" in line]

    await proxy.wait_for(lambda: any(not line["complete"] for line in audit()), "the cut transfer's audit line")
    lines = audit()
    whole = [line for line in lines if line["repo"] == "acme/private"]
    assert whole and all(line["complete"] is True and "cut_by" not in line for line in whole)
    [cut] = [line for line in lines if not line["complete"]]
    assert (cut["repo"], cut["status"], cut["cut_by"]) == ("acme/big", 200, "client")
    assert 0 < cut["bytes_out"] < 16 * 1024 * 1024
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.url}/metrics") as response:
        assert 'git_token_proxy_transfers_cut_total{side="client"} 1.0' in await response.text()
