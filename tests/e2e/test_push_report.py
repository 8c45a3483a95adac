"""The push gate with the real git CLI: a small gateway in front of the fake GitHub asks `check_push` about every
receive-pack request, answers a refusal itself and passes the rest on with a token. git must print
`[remote rejected] (<reason>)` and fail, the fake must never see a refused push, and allowed pushes must land."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.config.push import PushPolicyConfig
from proxy.push.compare import github_compare
from proxy.push.gate import PassOn, Refused, check_push, discard_rest
from proxy.push.outcome import UpstreamReport
from proxy.push.rules import BoundPolicy, PushPolicy
from proxy.testing import FakeGitHub, git_env, run_git_sync
from tests.support import Git

TOKEN = "push-gate-test-token-1234"
REPO = "acme/private"
FILES = {"README.md": b"# private\n"}


@dataclass
class Gateway:
    """What `forward` will do with the gate, reduced to the bytes: refusals answered here, the rest streamed on."""

    fake: FakeGitHub
    policies: Sequence[BoundPolicy]
    who: str = "run-42"
    outcomes: list[Refused | PassOn] = field(default_factory=list)
    reports: list[UpstreamReport] = field(default_factory=list)  # upstream's verdicts, for the audit
    url: str = ""
    _session: aiohttp.ClientSession | None = None
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        # No lingering: aiohttp would otherwise drain an unread body for 10 s on its own, hiding a refusal that
        # forgets to (git sends its whole body before it reads the answer).
        app = web.Application(handler_args={"auto_decompress": False, "lingering_time": 0})
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body: AsyncIterator[bytes] | bytes | None = None
        report: UpstreamReport | None = None
        if request.method == "POST" and request.path.endswith("/git-receive-pack"):
            compare = github_compare(self._session, self.fake.url, "acme", "private", f"Bearer {TOKEN}")
            outcome = await check_push(
                request.content, request.headers.get("Content-Encoding"), self.policies, self.who, compare
            )
            self.outcomes.append(outcome)
            if isinstance(outcome, Refused):
                await discard_rest(request.content, 1 << 30)  # or git, still sending, never reads the answer
                return web.Response(status=outcome.status, headers=outcome.headers, body=outcome.body)
            # git's probe (a lone flush) is read whole: sent with its length, as git sent it.
            probe = outcome.commands is not None and not outcome.commands.updates
            body = outcome.commands.raw if probe and outcome.commands else passed_on(outcome, request.content)
            if outcome.commands and outcome.commands.updates:
                refs = [update.ref for update in outcome.commands.updates]
                report = UpstreamReport(refs, outcome.commands.capabilities)
                self.reports.append(report)
        elif request.body_exists:
            body = request.content.iter_any()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "git-protocol")}
        headers["Authorization"] = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
        async with self._session.request(
            request.method, f"{self.fake.url}{request.path_qs}", data=body, headers=headers
        ) as answer:
            response = web.StreamResponse(status=answer.status, headers={"Content-Type": answer.content_type})
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                if report is not None:
                    report.feed(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response


def policy(refs: list[str], **flags: bool) -> list[BoundPolicy]:
    return [PushPolicy.from_config("client 'run-42'", PushPolicyConfig(refs=refs, **flags)).bind("run-42")]


@pytest.fixture
async def repo(fake_github: FakeGitHub) -> FakeGitHub:
    fake_github.create_repo(REPO, FILES)
    fake_github.add_token(TOKEN, repos=[REPO])
    return fake_github


async def gateway_for(fake: FakeGitHub, policies: Sequence[BoundPolicy]) -> Gateway:
    gateway = Gateway(fake, policies)
    await gateway.start()
    return gateway


@pytest.fixture
async def gateways() -> AsyncIterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        await gateway.close()


async def clone(git: Git, gateway: Gateway) -> Path:
    await git("clone", "--quiet", f"{gateway.url}/{REPO}.git", "work")
    return git.workdir / "work"


async def commit(git: Git, worktree: Path, name: str, content: bytes = b"x\n") -> str:
    (worktree / name).write_bytes(content)
    await git("add", name, cwd=worktree)
    await git("commit", "--quiet", "-m", f"add {name}", cwd=worktree)
    return (await git("rev-parse", "HEAD", cwd=worktree)).stdout.strip()


def upstream(fake: FakeGitHub, ref: str) -> str | None:
    found = run_git_sync(
        "rev-parse", "--verify", "--quiet", ref, env=git_env(fake.root / "home"), cwd=fake.repo_path(REPO)
    )
    return found.stdout.strip() if found.returncode == 0 else None


def receive_packs(fake: FakeGitHub) -> int:
    """Pushes upstream saw: receive-pack POSTs, but not git's 4-byte probe (a flush) before a large push."""
    return sum(
        1
        for seen in fake.git_requests
        if seen.method == "POST"
        and seen.path.endswith("git-receive-pack")
        and seen.headers.get("Content-Length") != "4"
    )


AGENT = ["refs/heads/agent/{client}/**"]


async def test_refused_push_is_a_remote_rejected_with_the_reason_and_never_reaches_upstream(
    repo: FakeGitHub, gateways: list[Gateway], git: Git
) -> None:
    gateways.append(gateway := await gateway_for(repo, policy(AGENT)))
    worktree = await clone(git, gateway)
    await commit(git, worktree, "a.txt")
    before = upstream(repo, "refs/heads/main")
    pushed = await git("push", "origin", "HEAD:main", cwd=worktree, check=False)
    assert pushed.returncode != 0
    assert (
        " ! [remote rejected] HEAD -> main (push to refs/heads/main is not allowed for 'run-42'; "
        "allowed: refs/heads/agent/run-42/**)"
    ) in pushed.stderr
    assert not pushed.prompted and "RPC failed" not in pushed.stderr
    assert upstream(repo, "refs/heads/main") == before
    assert receive_packs(repo) == 0


@pytest.mark.parametrize("capabilities", ["sideband", "no-sideband"])
async def test_report_is_read_with_and_without_side_band_and_atomic_names_the_refused_ref(
    repo: FakeGitHub, gateways: list[Gateway], git: Git, capabilities: str
) -> None:
    gateways.append(gateway := await gateway_for(repo, policy(AGENT)))
    worktree = await clone(git, gateway)
    await commit(git, worktree, "a.txt")
    # A git without side-band-64k: receive-pack's advertisement is what git reads, so the client is told so.
    extra = ["-c", "transfer.advertiseSideBand=false"] if capabilities == "no-sideband" else []
    pushed = await git(
        *extra, "push", "origin", "HEAD:refs/heads/agent/run-42/ok", "HEAD:refs/heads/main", cwd=worktree, check=False
    )
    assert pushed.returncode != 0
    assert "HEAD -> agent/run-42/ok (atomic: refs/heads/main is not allowed)" in pushed.stderr
    assert "HEAD -> main (push to refs/heads/main is not allowed" in pushed.stderr
    assert receive_packs(repo) == 0
    assert upstream(repo, "refs/heads/agent/run-42/ok") is None


async def test_allowed_push_lands_and_a_large_one_streams_through_git_s_probe(
    repo: FakeGitHub, gateways: list[Gateway], git: Git
) -> None:
    gateways.append(gateway := await gateway_for(repo, policy(AGENT)))
    worktree = await clone(git, gateway)
    small = await commit(git, worktree, "a.txt")
    await git("push", "--quiet", "origin", "HEAD:refs/heads/agent/run-42/one", cwd=worktree)
    assert upstream(repo, "refs/heads/agent/run-42/one") == small
    # Over http.postBuffer (1 MiB), git first POSTs a bare flush (its auth probe), then the body, chunked.
    large = await commit(git, worktree, "big.bin", os.urandom(3 << 20))
    await git("push", "--quiet", "origin", "HEAD:refs/heads/agent/run-42/one", cwd=worktree)
    assert upstream(repo, "refs/heads/agent/run-42/one") == large
    probes = [o for o in gateway.outcomes if isinstance(o, PassOn) and o.commands and not o.commands.updates]
    assert len(probes) == 1


async def test_a_large_refused_push_is_drained_so_that_git_reads_the_answer(
    repo: FakeGitHub, gateways: list[Gateway], git: Git
) -> None:
    """Decided on its command list, drained unread: answered early and closed, git would say `RPC failed`."""
    gateways.append(gateway := await gateway_for(repo, policy(AGENT)))
    worktree = await clone(git, gateway)
    await commit(git, worktree, "big.bin", os.urandom(4 << 20))
    pushed = await git("push", "origin", "HEAD:main", cwd=worktree, check=False)
    assert pushed.returncode != 0
    assert " ! [remote rejected] HEAD -> main (push to refs/heads/main is not allowed" in pushed.stderr
    assert receive_packs(repo) == 0


@pytest.mark.parametrize(
    ("refspec", "shown", "reason"),
    [
        (":refs/heads/agent/run-42/gone", "agent/run-42/gone", "deleting refs/heads/agent/run-42/gone is not allowed"),
        ("HEAD:refs/tags/v1", "v1", "push to refs/tags/v1 is not allowed"),
        ("HEAD:refs/heads/agentx", "agentx", "push to refs/heads/agentx is not allowed"),
        ("HEAD:refs/heads/agent/run-7/x", "agent/run-7/x", "push to refs/heads/agent/run-7/x is not allowed"),
    ],
)
async def test_deletes_tags_and_refs_outside_the_namespace_are_rejected(
    repo: FakeGitHub, gateways: list[Gateway], git: Git, refspec: str, shown: str, reason: str
) -> None:
    fake = repo
    run_git_sync("update-ref", "refs/heads/agent/run-42/gone", "main", env=git.env, cwd=fake.repo_path(REPO)).check()
    gateways.append(gateway := await gateway_for(fake, policy(["refs/heads/agent/**"]) + policy(AGENT)))
    worktree = await clone(git, gateway)
    await commit(git, worktree, "a.txt")
    pushed = await git("push", "origin", refspec, cwd=worktree, check=False)
    assert pushed.returncode != 0
    assert f"{shown} ({reason}" in pushed.stderr
    assert receive_packs(fake) == 0


async def test_force_push_and_rewind_are_refused_fast_forwards_pass_even_with_an_empty_pack(
    repo: FakeGitHub, gateways: list[Gateway], git: Git
) -> None:
    gateways.append(gateway := await gateway_for(repo, policy(AGENT)))
    worktree = await clone(git, gateway)
    ref, other = "refs/heads/agent/run-42/work", "refs/heads/agent/run-42/other"
    first = await commit(git, worktree, "a.txt")
    await git("push", "--quiet", "origin", f"HEAD:{ref}", cwd=worktree)
    second = await commit(git, worktree, "b.txt")
    await git("push", "--quiet", "origin", f"HEAD:{ref}", cwd=worktree)  # a fast-forward, its commit in the pack
    assert upstream(repo, ref) == second
    await git("reset", "--quiet", "--hard", first, cwd=worktree)
    await commit(git, worktree, "c.txt")
    forced = await git("push", "--force", "origin", f"HEAD:{ref}", cwd=worktree, check=False)  # a rewrite
    assert forced.returncode != 0
    assert f"(non-fast-forward update of {ref} is not allowed for 'run-42' (push.force: false)" in forced.stderr
    rewind = await git("push", "--force", "origin", f"{first}:{ref}", cwd=worktree, check=False)  # an empty pack
    assert rewind.returncode != 0 and "non-fast-forward update" in rewind.stderr
    assert upstream(repo, ref) == second
    # Fast-forwards to commits upstream already has (empty packs): decided by GitHub's compare API.
    await git("push", "--quiet", "origin", f"{first}:{other}", cwd=worktree)
    await git("push", "--quiet", "origin", f"{second}:{other}", cwd=worktree)
    assert upstream(repo, other) == second
    # --force-with-lease on a fast-forward.
    await git("reset", "--quiet", "--hard", second, cwd=worktree)
    third = await commit(git, worktree, "d.txt")
    await git("push", "--quiet", f"--force-with-lease={ref}:{second}", "origin", f"HEAD:{ref}", cwd=worktree)
    assert upstream(repo, ref) == third
    assert receive_packs(repo) == 5


async def test_force_true_allows_the_rewrite_and_upstream_s_own_verdicts_are_read(
    repo: FakeGitHub, gateways: list[Gateway], git: Git
) -> None:
    gateways.append(gateway := await gateway_for(repo, policy(AGENT, force=True)))
    worktree = await clone(git, gateway)
    ref = "refs/heads/agent/run-42/work"
    first = await commit(git, worktree, "a.txt")
    await commit(git, worktree, "b.txt")
    await git("push", "--quiet", "origin", f"HEAD:{ref}", cwd=worktree)
    await git("push", "--quiet", "--force", "origin", f"{first}:{ref}", cwd=worktree)
    assert upstream(repo, ref) == first
    assert [report.results for report in gateway.reports] == [{ref: "ok"}, {ref: "ok"}]
    # Upstream has its own rule (a ruleset, here receive.denyNonFastForwards): its `ng` is what the audit keeps.
    run_git_sync("config", "receive.denyNonFastForwards", "true", env=git.env, cwd=repo.repo_path(REPO)).check()
    third = await commit(git, worktree, "c.txt")
    await git("push", "--quiet", "origin", f"HEAD:{ref}", cwd=worktree)
    denied = await git("push", "--force", "origin", f"{first}:{ref}", cwd=worktree, check=False)
    assert denied.returncode != 0 and "[remote rejected]" in denied.stderr
    assert upstream(repo, ref) == third
    assert gateway.reports[-1].results == {ref: "ng:non-fast-forward"}


async def test_push_options_and_atomic_pushes_are_read_and_decided(
    repo: FakeGitHub, gateways: list[Gateway], git: Git
) -> None:
    run_git_sync("config", "receive.advertisePushOptions", "true", env=git.env, cwd=repo.repo_path(REPO)).check()
    gateways.append(gateway := await gateway_for(repo, policy(AGENT)))
    worktree = await clone(git, gateway)
    tip = await commit(git, worktree, "a.txt")
    refspecs = ["HEAD:refs/heads/agent/run-42/a", "HEAD:refs/heads/agent/run-42/b"]
    await git("push", "--quiet", "--atomic", "-o", "ci.skip", "-o", "note=x y", "origin", *refspecs, cwd=worktree)
    assert upstream(repo, "refs/heads/agent/run-42/a") == upstream(repo, "refs/heads/agent/run-42/b") == tip
    passed = [o for o in gateway.outcomes if isinstance(o, PassOn) and o.commands and o.commands.updates]
    assert passed[-1].commands is not None and passed[-1].commands.push_options == ("ci.skip", "note=x y")
    await commit(git, worktree, "b.txt")
    refused = await git("push", "--atomic", "-o", "ci.skip", "origin", "HEAD:refs/heads/agent/run-42/a",
                        "HEAD:refs/tags/v1", cwd=worktree, check=False)  # fmt: skip
    assert refused.returncode != 0
    assert "HEAD -> agent/run-42/a (atomic: refs/tags/v1 is not allowed)" in refused.stderr
    assert upstream(repo, "refs/heads/agent/run-42/a") == tip


async def passed_on(outcome: PassOn, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """What a push that may go on sends upstream: the bytes the check read, then the rest as it comes."""
    async for chunk in outcome.prefix():
        yield chunk
    async for chunk in content.iter_any():
        yield chunk
