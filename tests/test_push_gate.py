"""The gate on real pushes: receive-pack bodies made of real packs, fast-forwards decided with the fake GitHub's
compare API (real git on the fake's repo), refusals answered as receive-pack reports, held bytes always let go."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.bodies import HeldBytes
from proxy.push.ancestry import CompareFn
from proxy.push.budget import CompareBudget
from proxy.push.commands import ZERO_ID
from proxy.push.compare import github_compare
from proxy.push.decide import Reason
from proxy.push.gate import PassOn, PushLimits, Refused, check_push, discard_rest
from proxy.push.report import RESULT_TYPE
from proxy.push.rules import BoundPolicy, PushPolicy, PushPolicyConfig
from proxy.testing import CannedAnswer, FakeGitHub
from tests.test_push_commands import body_stream, pkt
from tests.test_push_pack import Repo

TOKEN = "gate-test-token-123456"
BRANCH = "refs/heads/agent/run-42/work"
CAPS = "report-status report-status-v2 side-band-64k quiet atomic object-format=sha1 agent=git/2.47.0"


def policy(**settings: object) -> list[BoundPolicy]:
    config = PushPolicyConfig.model_validate({"refs": ["refs/heads/agent/{client}/**"], **settings})
    return [PushPolicy.from_config("client 'run-42'", config).bind("run-42")]


def receive_pack_body(updates: list[tuple[str, str, str]], pack: bytes, caps: str = CAPS) -> bytes:
    lines = [
        f"{old} {new} {ref}" + (f"\0{caps}" if index == 0 else "") for index, (old, new, ref) in enumerate(updates)
    ]
    return b"".join(pkt(line) for line in lines) + b"0000" + pack


@dataclass
class World:
    """A repo on the fake GitHub and a local clone of it to make commits and packs with."""

    fake: FakeGitHub
    local: Repo
    compare: CompareFn
    stream: aiohttp.StreamReader | None = None

    def publish(self, commit: str, ref: str) -> None:
        """Upstream gets `commit` at `ref`, behind the gate's back."""
        self.local.git("push", "--quiet", "--force", str(self.fake.repo_path("acme/private")), f"{commit}:{ref}")

    def compares(self) -> int:
        return len(self.fake.apps.statuses("compare"))

    async def check(
        self, body: bytes, policies: list[BoundPolicy] | None = None, *, chunk: int = 65536,
        encoding: str | None = None, api: bool = True, limits: PushLimits | None = None,
    ) -> Refused | PassOn:  # fmt: skip
        policies = policies if policies is not None else policy()
        compare = self.compare if api else None
        self.stream = body_stream(body, chunk)
        return await check_push(self.stream, encoding, policies, "run-42", compare, limits)

    async def passed(self, outcome: PassOn) -> bytes:
        """What goes upstream: the bytes the check read, then the rest of the body as it comes."""
        return b"".join([chunk async for chunk in outcome.prefix()] + [chunk async for chunk in self.stream.iter_any()])


@pytest.fixture
async def world(fake_github: FakeGitHub, tmp_path: Path) -> AsyncIterator[World]:
    fake_github.create_repo("acme/private", {"README.md": b"# private\n"})
    fake_github.add_token(TOKEN, repos=["acme/private"])
    local = Repo(tmp_path / "local")
    local.git("pull", "--quiet", str(fake_github.repo_path("acme/private")), "main")
    async with aiohttp.ClientSession() as session:
        yield World(fake_github, local, github_compare(session, fake_github.url, "acme", "private", f"Bearer {TOKEN}"))


def report_lines(outcome: Refused) -> list[str]:
    """The report inside side-band-64k's band 1, as git reads it."""
    assert outcome.status == 200 and outcome.headers["Content-Type"] == RESULT_TYPE
    data, inner = outcome.body, bytearray()
    while (length := int(data[:4], 16)) != 0:
        assert data[4] == 1
        inner += data[5:length]
        data = data[length:]
    assert data == b"0000"
    lines = []
    while (length := int(inner[:4], 16)) != 0:
        lines.append(inner[4:length].decode().rstrip("\n"))
        inner = inner[length:]
    return lines


async def test_a_fast_forward_passes_on_every_byte_asking_github_nothing(world: World) -> None:
    old = world.local.head()
    world.publish(old, BRANCH)
    new = world.local.commit("a.txt")
    body = receive_pack_body([(old, new, BRANCH)], world.local.pack(new, f"^{old}", thin=True))
    outcome = await world.check(body, chunk=5)
    assert isinstance(outcome, PassOn)
    assert [r.as_audit() for r in outcome.refs] == [{"ref": BRANCH, "old": old, "new": new, "result": "ok"}]
    assert await world.passed(outcome) == body
    assert world.compares() == 0  # the pushed commit's parent is the old tip itself


async def test_a_large_fast_forward_is_decided_on_its_commits_and_the_rest_streams(world: World) -> None:
    old = world.local.head()
    new = world.local.commit("big.bin", os.urandom(3 << 20))
    body = receive_pack_body([(old, new, BRANCH)], world.local.pack(new, f"^{old}"))
    outcome = await world.check(body)
    assert isinstance(outcome, PassOn)
    assert outcome.read < 1 << 20  # the commit and the first tree, not the blob
    assert await world.passed(outcome) == body


async def test_fast_forward_and_rewind_to_commits_upstream_has_are_asked_of_github(world: World) -> None:
    first = world.local.head()
    second = world.local.commit("a.txt")
    world.publish(second, "refs/heads/other")
    empty = world.local.pack(second, f"^{second}")
    forward = await world.check(receive_pack_body([(first, second, BRANCH)], empty))
    assert isinstance(forward, PassOn)
    forward.release()
    rewind = await world.check(receive_pack_body([(second, first, BRANCH)], empty))
    assert isinstance(rewind, Refused) and rewind.reason is Reason.FORCE
    assert report_lines(rewind) == [
        "unpack ok",
        f"ng {BRANCH} non-fast-forward update of {BRANCH} is not allowed for 'run-42' (push.force: false); "
        "fetch, then rebase or merge, and push again",
    ]
    assert rewind.refs[0].result == "refused:force"
    assert world.compares() == 2


async def test_a_rewrite_is_a_force_push(world: World) -> None:
    base = world.local.head()
    published = world.local.commit("a.txt")
    world.publish(published, BRANCH)
    world.local.git("reset", "--quiet", "--hard", base)
    rewritten = world.local.commit("b.txt")
    body = receive_pack_body([(published, rewritten, BRANCH)], world.local.pack(rewritten, f"^{published}"))
    outcome = await world.check(body)
    assert isinstance(outcome, Refused) and outcome.reason is Reason.FORCE
    assert world.compares() == 1  # base...published: `behind`, the boundary is an ancestor of the old tip


async def test_a_merge_of_upstream_branches_is_a_fast_forward_of_either(world: World) -> None:
    base = world.local.head()
    feature = world.local.commit("f.txt")
    world.publish(feature, "refs/heads/feature")
    world.local.git("checkout", "--quiet", "-b", "later", base)
    later = world.local.commit("l.txt")
    world.publish(later, "refs/heads/later")
    world.local.git("merge", "--quiet", "--no-edit", feature)
    merge = world.local.head()
    pack = world.local.pack(merge, f"^{feature}", f"^{later}")
    outcome = await world.check(receive_pack_body([(base, merge, BRANCH)], pack))
    assert isinstance(outcome, PassOn)
    outcome.release()
    assert world.compares() == 1


async def test_unrelated_history_is_a_force_push_and_an_unknown_commit_is_undecidable(world: World) -> None:
    old = world.local.head()
    world.local.git("checkout", "--quiet", "--orphan", "orphan")
    orphan = world.local.commit("o.txt")
    world.publish(orphan, "refs/heads/orphan")
    empty = world.local.pack(orphan, f"^{orphan}")
    unrelated = await world.check(receive_pack_body([(old, orphan, BRANCH)], empty))
    assert isinstance(unrelated, Refused) and unrelated.reason is Reason.FORCE
    unknown = await world.check(receive_pack_body([(old, "d" * 40, BRANCH)], empty))
    assert isinstance(unknown, Refused) and unknown.reason is Reason.UNDECIDABLE
    assert f"commit {'d' * 12} is neither in the push nor on GitHub" in report_lines(unknown)[1]


async def test_a_failing_compare_api_is_undecidable_and_says_what_to_do(world: World) -> None:
    old = world.local.head()
    new = world.local.commit("a.txt")
    world.publish(new, "refs/heads/other")
    world.fake.apps.script_next("compare", CannedAnswer.error(502, "Server Error"))
    outcome = await world.check(receive_pack_body([(old, new, BRANCH)], world.local.pack(new, f"^{new}")))
    assert isinstance(outcome, Refused) and outcome.reason is Reason.UNDECIDABLE
    assert report_lines(outcome)[1] == (
        f"ng {BRANCH} cannot tell whether the update of {BRANCH} is a fast-forward: GitHub's compare API failed "
        "(HTTP 502); fetch, rebase or merge onto the branch, and push again (or ask for push.force: true)"
    )
    no_api = await world.check(receive_pack_body([(old, new, BRANCH)], b""), api=False)
    assert isinstance(no_api, Refused) and no_api.reason is Reason.UNDECIDABLE


async def test_force_true_and_creates_read_no_pack_at_all(world: World) -> None:
    old = world.local.head()
    new = world.local.commit("a.txt")
    pack = world.local.pack(new, f"^{old}")
    for updates, policies in (([(old, new, BRANCH)], policy(force=True)), ([(ZERO_ID, new, BRANCH)], policy())):
        outcome = await world.check(receive_pack_body(updates, pack), policies)
        assert isinstance(outcome, PassOn)
        outcome.release()
        assert outcome.commands is not None and outcome.read == len(outcome.commands.raw)
    assert world.compares() == 0


async def test_a_refused_ref_refuses_the_push_before_its_pack_or_github(world: World) -> None:
    old = world.local.head()
    new = world.local.commit("a.txt")
    body = receive_pack_body([(old, new, BRANCH), (old, new, "refs/heads/main")], world.local.pack(new, f"^{old}"))
    outcome = await world.check(body)
    assert isinstance(outcome, Refused) and outcome.reason is Reason.REF
    assert report_lines(outcome) == [
        "unpack ok",
        f"ng {BRANCH} atomic: refs/heads/main is not allowed",
        "ng refs/heads/main push to refs/heads/main is not allowed for 'run-42'; allowed: refs/heads/agent/run-42/**",
    ]
    assert [r.result for r in outcome.refs] == ["refused:atomic", "refused:ref"]
    assert world.compares() == 0


async def test_malformed_bodies_compression_and_clients_without_a_report(world: World) -> None:
    old = world.local.head()
    new = world.local.commit("a.txt")
    good = receive_pack_body([(old, new, BRANCH)], world.local.pack(new, f"^{old}"))
    gzipped = await world.check(good, encoding="gzip")
    assert isinstance(gzipped, Refused) and gzipped.status == 400 and gzipped.reason is Reason.MALFORMED
    assert gzipped.body.startswith(b"push refused for 'run-42': a malformed receive-pack request: a compressed")
    broken = await world.check(good[:-30] + b"\xff" * 30)
    assert isinstance(broken, Refused) and broken.reason is Reason.MALFORMED
    assert "a malformed pack" in report_lines(broken)[1]
    bare = await world.check(receive_pack_body([(old, new, "refs/heads/main")], b"", caps="agent=x"))
    assert isinstance(bare, Refused) and bare.status == 403 and bare.body.startswith(b"push refused: push to")


async def test_a_pack_over_the_checked_size_is_undecidable(world: World) -> None:
    old = world.local.head()
    new = world.local.commit("a.txt")
    outcome = await world.check(receive_pack_body([(old, new, BRANCH)], world.local.pack(new, f"^{old}")),
                                policy(maxCheckedPackSize=40))  # fmt: skip
    assert isinstance(outcome, Refused) and outcome.reason is Reason.UNDECIDABLE
    assert "over push.maxCheckedPackSize (40 bytes)" in report_lines(outcome)[1]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_held_bytes_are_let_go_on_every_path(world: World, tmp_path: Path) -> None:
    old = world.local.head()
    # Commits only (their trees are upstream's): the whole pack is held, past the in-memory part, onto disk.
    new = world.local.empty_commits(150, 20_000)
    pack = world.local.pack(new, f"^{old}", window=0)
    assert len(pack) > 1 << 20
    spill = tmp_path / "spill"
    spill.mkdir()
    limits = PushLimits(temp_dir=spill)
    before = open_files()
    passed = await world.check(receive_pack_body([(old, new, BRANCH)], pack), limits=limits)
    assert isinstance(passed, PassOn) and passed.read > 1 << 20
    assert open_files() == before + 1  # the held pack, in an unnamed file
    assert await world.passed(passed) == receive_pack_body([(old, new, BRANCH)], pack)
    assert open_files() == before
    too_large = policy(maxCheckedPackSize=len(pack) - 100)  # past the in-memory part, then refused
    refused = await world.check(receive_pack_body([(old, new, BRANCH)], pack), too_large, limits=limits)
    assert isinstance(refused, Refused) and refused.reason is Reason.UNDECIDABLE
    assert open_files() == before
    dropped = await world.check(receive_pack_body([(old, new, BRANCH)], pack), limits=limits)
    assert isinstance(dropped, PassOn)
    dropped.release()
    dropped.release()
    assert open_files() == before
    assert not os.listdir(spill)


async def test_pushes_checked_at_once_share_one_bound_on_what_they_hold(world: World) -> None:
    """Each check holds its pack until it is sent on; together they hold no more than `shared`'s limit, and a
    push past it is refused as undecidable with the reason, not queued on disk."""
    old = world.local.head()
    new = world.local.empty_commits(60, 20_000)
    pack = world.local.pack(new, f"^{old}", window=0)
    shared = HeldBytes(len(pack) + len(pack) // 2)
    limits = PushLimits(shared=shared)
    first = await world.check(receive_pack_body([(old, new, BRANCH)], pack), limits=limits)
    assert isinstance(first, PassOn) and shared.held == len(pack)
    second = await world.check(receive_pack_body([(old, new, BRANCH)], pack), limits=limits)
    assert isinstance(second, Refused) and second.reason is Reason.UNDECIDABLE
    assert "holds" in report_lines(second)[1] and "push again in a moment" in report_lines(second)[1]
    assert shared.held == len(pack)  # the refused one gave back what it had taken
    first.release()
    assert shared.held == 0
    third = await world.check(receive_pack_body([(old, new, BRANCH)], pack), limits=limits)
    assert isinstance(third, PassOn)
    third.release()
    assert shared.held == 0


async def test_one_push_walks_its_commits_within_one_budget_whatever_its_updates(world: World) -> None:
    """Many updates of one long history: each walk counts against the push's budget, not only its own."""
    old = world.local.head()
    new = world.local.empty_commits(100, 100)
    pack = world.local.pack(new, f"^{old}", window=0)
    refs = [f"{BRANCH}-{index}" for index in range(4)]
    for ref in refs:
        world.publish(old, ref)
    body = receive_pack_body([(old, new, ref) for ref in refs], pack)
    within = await world.check(body, limits=PushLimits(max_walk_total=1000))
    assert isinstance(within, PassOn)
    within.release()
    over = await world.check(body, limits=PushLimits(max_walk_total=250))
    assert isinstance(over, Refused) and over.reason is Reason.UNDECIDABLE
    assert any("more than 250 new commits to walk in this push" in line for line in report_lines(over))


async def test_the_compare_budget_is_shared_by_an_entry_and_kept_per_party() -> None:
    budget = CompareBudget(entry_per_hour=60, party_per_hour=30)  # buckets of 4 and 2 questions
    assert [await budget.spend("acme", "run-42") for _ in range(3)] == [True, True, False]
    assert "'run-42' has spent its 30 questions" in budget.describe("acme", "run-42")
    assert [await budget.spend("acme", "run-77") for _ in range(3)] == [True, True, False]
    assert not await budget.spend("acme", "run-99")  # the entry's share is spent, whoever asks
    assert "the auth entry's 60 questions to GitHub an hour are spent" in budget.describe("acme", "run-99")
    assert await budget.spend("other", "run-42")  # another entry has its own


async def test_the_rest_of_a_refused_push_is_drained_within_a_bound() -> None:
    assert await discard_rest(body_stream(b"x" * 300_000), 300_000)
    assert not await discard_rest(body_stream(b"x" * 300_001), 300_000)
