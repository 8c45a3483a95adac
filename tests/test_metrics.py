"""Metrics: /metrics parses as Prometheus text and its counters move as they should across real git traffic."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.testing import FakeGitHub
from tests.support import AcmeApp, Git, StartProxy, app_config


async def scrape(proxy: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_follow_cold_warm_refused_failed_and_healed_traffic(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, git: Git
) -> None:
    config = app_config(fake_github.url, acme_app)
    # A second app entry for another org, whose mints will fail.
    other = fake_github.apps.add_installation(acme_app.app, "octo")
    fake_github.create_repo("octo/tool", {"name.txt": b"tool"})
    config["github"]["appInstallation"]["auth"].append(
        {**config["github"]["appInstallation"]["auth"][0], "id": "octo-app",
         "urlPattern": r"(?<baseUrl>github\.com)/octo/.*", "installationId": other.id}
    )  # fmt: skip
    proxy = await start_proxy(config)

    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "cold")
    after_cold = await scrape(proxy)
    assert value(after_cold, "git_token_proxy_token_mints_total", entry="acme-app") == 1
    assert value(after_cold, "git_token_proxy_token_cache_misses_total", entry="acme-app") == 1
    cold_hits = value(after_cold, "git_token_proxy_token_cache_hits_total", entry="acme-app")
    served = value(after_cold, "git_token_proxy_requests_total", service="upload-pack", status_class="2xx")
    assert served >= 2 and cold_hits == served - 1
    assert value(after_cold, "git_token_proxy_token_mint_seconds_count", entry="acme-app") == 1
    assert 3500 < value(after_cold, "git_token_proxy_token_soonest_expiry_seconds") <= 3600

    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "warm")
    after_warm = await scrape(proxy)
    assert value(after_warm, "git_token_proxy_token_mints_total", entry="acme-app") == 1
    assert value(after_warm, "git_token_proxy_token_cache_hits_total", entry="acme-app") == cold_hits + served
    assert value(after_warm, "git_token_proxy_sent_bytes_total", service="upload-pack") > value(
        after_cold, "git_token_proxy_sent_bytes_total", service="upload-pack"
    )

    await git("clone", f"{proxy}/evil.example/acme/private", "refused", check=False)
    fake_github.apps.fail_next_mints(3)
    await git("clone", f"{proxy}/github.com/octo/tool", "failed", check=False)
    fake_github.apps.revoke_all_tokens()
    await git("clone", "--quiet", f"{proxy}/github.com/acme/private", "healed")

    final = await scrape(proxy)
    assert value(final, "git_token_proxy_requests_total", service="refused", status_class="4xx") >= 1
    assert value(final, "git_token_proxy_token_mint_failures_total", entry="octo-app", reason="upstream_error") == 1
    assert value(final, "git_token_proxy_token_heals_total", entry="acme-app") == 1
    assert value(final, "git_token_proxy_token_mints_total", entry="acme-app") == 2
    assert value(final, "git_token_proxy_requests_in_flight") == 0  # /metrics itself is not a git request
    assert value(final, "git_token_proxy_requests_total", service="refused", status_class="5xx") >= 1  # octo
    assert value(final, "git_token_proxy_upstream_response_seconds_count", service="upload-pack") >= 3 * served
    labels = {dict(labels).get("entry") for (_, labels) in final if dict(labels).get("entry")}
    assert labels == {"acme-app", "octo-app"}  # bounded: entries only, never repos or clients


async def test_readyz_follows_the_github_check(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy
) -> None:
    import asyncio

    from proxy.testing import generate_app_key, pkcs1_pem

    readiness = {"checkGitHub": True, "interval": "200ms", "maxAge": "1s"}
    good = await start_proxy({**app_config(fake_github.url, acme_app), "readiness": readiness})
    acme_app.key_file.write_text(pkcs1_pem(generate_app_key()))  # a second proxy, with a key GitHub rejects
    bad = await start_proxy({**app_config(fake_github.url, acme_app), "readiness": readiness})
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{good}/readyz") as ready:
            assert (ready.status, await ready.text()) == (200, "ready\n")
        async with session.get(f"{bad}/readyz") as not_ready:
            assert not_ready.status == 503 and "acme-app" in await not_ready.text()
        async with session.get(f"{bad}/healthz") as alive:
            assert alive.status == 200  # liveness never depends on GitHub


async def test_readyz_recovers_after_malformed_and_rate_limited_app_answers(
    fake_github: FakeGitHub, acme_app: AcmeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers that once killed the prober (a 429 with `Retry-After: inf`, a body of the wrong shape) must never
    keep /readyz at 503 once GitHub answers well again: the next round succeeds, and a reload forgets a limit."""
    import asyncio

    from proxy.app import PROXY
    from proxy.config import parse_config
    from proxy.testing import CannedAnswer
    from proxy.testing.harness import start_proxy_app

    fake_github.apps.script_next(
        "app",
        CannedAnswer.json(200, {"id": True, "slug": ["x"]}),
        CannedAnswer.json(200, [1, 2, 3]),
        CannedAnswer(200, b"\xff\xfe not json", {"Content-Type": "application/json"}),
    )
    readiness = {"checkGitHub": True, "interval": "200ms", "maxAge": "1s"}
    config = {**app_config(fake_github.url, acme_app), "readiness": readiness}
    runner, proxy_url = await start_proxy_app(config)
    app = runner.app
    url = f"{proxy_url}/readyz"

    async def ready_within(seconds: float) -> bool:
        deadline = asyncio.get_running_loop().time() + seconds
        async with aiohttp.ClientSession() as session:
            while asyncio.get_running_loop().time() < deadline:
                async with session.get(url) as response:
                    if response.status == 200:
                        return True
                await asyncio.sleep(0.05)
        return False

    try:
        assert await ready_within(5)
        assert fake_github.apps.statuses("app")[:3] == [200, 200, 200]  # three bad answers, seen and survived
        fake_github.apps.script_next("app", CannedAnswer.error(429, "rate limited", {"Retry-After": "inf"}))
        await asyncio.sleep(1.5)  # the 429 arrives, and the last success ages past maxAge
        assert not await ready_within(0.3)  # GitHub said to wait: not ready, but the prober lives on
        await app[PROXY].reload(parse_config(config))  # the operator's "try again"
        assert await ready_within(2)  # within two probe intervals and some slack
        # A wait longer than any window GitHub has is not GitHub's: it counts as unreadable (60 s), not an hour.
        fake_github.apps.script_next("app", CannedAnswer.error(429, "rate limited", {"Retry-After": "1e300"}))
        await asyncio.sleep(0.5)
        waits = [r.getMessage() for r in caplog.records if "readiness: GitHub check" in r.getMessage()]
        assert waits and 0 < int(waits[-1].rsplit("(in ", 1)[1].split(" s)")[0]) <= 60, waits
    finally:
        await runner.cleanup()


def test_no_created_twins_and_the_process_collector() -> None:
    """`_created` series double a scrape for nothing; the standard process_* series are expected by dashboards."""
    from prometheus_client import generate_latest

    from proxy.metrics import Metrics

    metrics = Metrics()
    metrics.requests.labels("upload-pack", "2xx").inc()
    text = generate_latest(metrics.registry).decode()
    assert "git_token_proxy_requests_total" in text and "_created" not in text
    assert "process_resident_memory_bytes" in text and "process_start_time_seconds" in text


async def test_a_key_github_rejects_makes_readyz_503_at_start_up_without_readiness_settings(
    fake_github: FakeGitHub, acme_app: AcmeApp, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19, item 4: a key of another app was found only at the first clone, while pods went Ready. Each app
    is proved once at start-up (and after a reload): a definitive refusal is an error line and a 503 naming the
    entry, with or without readiness.checkGitHub."""
    import asyncio

    from proxy.testing import generate_app_key, pkcs1_pem

    acme_app.key_file.write_text(pkcs1_pem(generate_app_key()))  # another app's key
    proxy = await start_proxy(app_config(fake_github.url, acme_app))
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"{proxy}/readyz") as response:
                status, text = response.status, await response.text()
            if status == 503:
                break
            await asyncio.sleep(0.05)
    assert status == 503 and "GitHub rejects the key of acme-app" in text and "could not be decoded" in text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "entry 'acme-app'" in r.getMessage()]
    assert errors and "the private key does not belong to the app" in errors[0]


async def test_github_unreachable_at_start_up_leaves_the_proxy_ready(
    acme_app: AcmeApp, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from proxy.testing.process import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: a network blip at start-up
    config = app_config(closed, acme_app, settings={"httpClientTimeout": "1s"})
    proxy = await start_proxy(config)
    for _ in range(100):
        if any("GitHub check for 'acme-app' failed" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    warned = [r for r in caplog.records if "GitHub check for 'acme-app' failed" in r.getMessage()]
    assert warned and warned[0].levelname == "WARNING"
    async with aiohttp.ClientSession() as session, session.get(f"{proxy}/readyz") as response:
        assert (response.status, await response.text()) == (200, "ready\n")
