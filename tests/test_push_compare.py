"""GitHub's compare API as the fast-forward oracle: the fake's real answers, and GitHub at its worst."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.push.ancestry import Ancestry, CompareFailed, UnknownCommit
from proxy.push.compare import MAX_ANSWER, compare_commits
from proxy.testing import CannedAnswer, FakeGitHub
from tests.support import UpstreamApp
from tests.test_push_pack import Repo

TOKEN = "compare-test-token-1234"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


@pytest.fixture
def history(fake_github: FakeGitHub, tmp_path: Path) -> dict[str, str]:
    """base <- ahead, base <- side (diverged from ahead), and an unrelated root, all on the fake."""
    fake_github.create_repo("acme/private", {"README.md": b"# private\n"})
    fake_github.add_token(TOKEN, repos=["acme/private"])
    local = Repo(tmp_path / "local")
    upstream = str(fake_github.repo_path("acme/private"))
    local.git("pull", "--quiet", upstream, "main")
    commits = {"base": local.head(), "ahead": local.commit("a.txt")}
    local.git("checkout", "--quiet", "-b", "side", commits["base"])
    commits["side"] = local.commit("s.txt")
    local.git("checkout", "--quiet", "--orphan", "root")
    commits["root"] = local.commit("r.txt")
    for name in ("ahead", "side", "root"):
        local.git("push", "--quiet", upstream, f"{commits[name]}:refs/heads/{name}")
    return commits


async def ask(session: aiohttp.ClientSession, fake: FakeGitHub, base: str, head: str, token: str = TOKEN) -> Ancestry:
    return await compare_commits(session, fake.url, "acme", "private", f"Bearer {token}", base, head)


async def test_answers_of_the_fake_s_compare_api(
    session: aiohttp.ClientSession, fake_github: FakeGitHub, history: dict[str, str]
) -> None:
    cases = [
        ("base", "ahead", Ancestry.AHEAD),
        ("ahead", "base", Ancestry.BEHIND),
        ("ahead", "ahead", Ancestry.IDENTICAL),
        ("ahead", "side", Ancestry.DIVERGED),
        ("ahead", "root", Ancestry.DIVERGED),  # GitHub's 404 "No common ancestor between …"
    ]
    for base, head, expected in cases:
        assert await ask(session, fake_github, history[base], history[head]) is expected, (base, head)


async def test_the_fake_answers_as_github_does(
    session: aiohttp.ClientSession, fake_github: FakeGitHub, history: dict[str, str]
) -> None:
    url = f"{fake_github.url}/repos/acme/private/compare/{history['base']}...{history['ahead']}?per_page=1"
    async with session.get(url, headers={"Authorization": f"token {TOKEN}"}) as answer:
        body = await answer.json()
    assert (body["status"], body["ahead_by"], body["behind_by"], body["total_commits"]) == ("ahead", 1, 0, 1)
    assert body["merge_base_commit"]["sha"] == body["base_commit"]["sha"] == history["base"]
    assert [c["sha"] for c in body["commits"]] == [history["ahead"]]
    assert [f["filename"] for f in body["files"]] == ["a.txt"]
    async with session.get(url) as anonymous:
        assert anonymous.status == 404 and (await anonymous.json())["message"] == "Not Found"
    fake_github.add_token("other-repo-token-1234", repos=["acme/other"])
    async with session.get(url, headers={"Authorization": "Bearer other-repo-token-1234"}) as elsewhere:
        assert elsewhere.status == 404


async def test_an_unknown_commit_and_failures(
    session: aiohttp.ClientSession, fake_github: FakeGitHub, history: dict[str, str]
) -> None:
    with pytest.raises(UnknownCommit):
        await ask(session, fake_github, history["base"], "d" * 40)
    with pytest.raises(UnknownCommit):  # a token that cannot see the repo: GitHub's 404 too
        await ask(session, fake_github, history["base"], history["ahead"], token="not-a-token-at-all")
    with pytest.raises(CompareFailed, match="only commit ids"):
        await ask(session, fake_github, "main", history["ahead"])
    scripts = [
        (CannedAnswer.error(500, "Server Error"), "HTTP 500"),
        (CannedAnswer.error(403, "API rate limit exceeded"), "HTTP 403"),
        (CannedAnswer.json(200, {"status": "ahead", "ahead_by": 0, "behind_by": 0}), "a malformed answer"),
        (CannedAnswer.json(200, {"status": "ahead", "ahead_by": "1", "behind_by": 0}), "a malformed answer"),
        (CannedAnswer.json(200, {"status": "sideways", "ahead_by": 1, "behind_by": 0}), "a malformed answer"),
        (CannedAnswer(200, b"[" * 100_000, {"Content-Type": "application/json"}), "a malformed answer"),
        (CannedAnswer.gzip_bomb(200, 16), f"an answer over {MAX_ANSWER >> 20} MiB"),
        (CannedAnswer(301, b"", {"Location": "https://elsewhere.example/x"}), "HTTP 301"),
    ]
    for canned, problem in scripts:
        fake_github.apps.script_next("compare", canned)
        with pytest.raises(CompareFailed, match=problem):
            await ask(session, fake_github, history["base"], history["ahead"])


async def test_a_large_realistic_answer_is_read_and_a_silent_api_times_out(
    session: aiohttp.ClientSession, upstream_app: UpstreamApp
) -> None:
    files = [{"filename": f"f{i}.txt", "patch": "+" * 20_000} for i in range(300)]  # about 6 MiB

    async def slow_or_large(request: web.Request) -> web.StreamResponse:
        if "slow" in request.path:
            await asyncio.sleep(5)
        answer = json.dumps({"status": "behind", "ahead_by": 0, "behind_by": 2, "files": files}).encode()
        return web.Response(body=io.BytesIO(answer), content_type="application/json")

    url = await upstream_app(slow_or_large)
    assert await compare_commits(session, url, "acme", "x", "Bearer t", "a" * 40, "b" * 40) is Ancestry.BEHIND
    with pytest.raises(CompareFailed, match="no answer within 0 s"):
        await compare_commits(session, url, "acme", "slow", "Bearer t", "a" * 40, "b" * 40, within=0.2)
