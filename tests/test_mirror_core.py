"""The mirror's core (proxy/mirror/) with real git and the fake GitHub: filling, serving, single flight, integrity,
eviction, and where the credential goes. The authorization proof and the HTTP edge are tested in tests/e2e/."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import MirrorConfig
from proxy.credentials import Credential
from proxy.metrics import Metrics
from proxy.mirror import Mirror, MirrorAnswer, is_pack_request
from proxy.mirror.pktline import NotAPackRequest, parse_pack_request
from proxy.testing import FakeGitHub, git_env, run_git_sync
from tests.support import Git

pytestmark = pytest.mark.timeout(120)

TOKEN = "mirror-core-token-0123456789abcdef"
FILES = {"README.md": b"# app\n", "src/app.py": b"print('hello')\n"}


# ---------------------------------------------------------------- set-up


def pkt(line: str) -> bytes:
    data = line.encode()
    return b"%04x" % (len(data) + 4) + data


FLUSH, DELIM = b"0000", b"0001"


def v2_fetch(*wants: str, args: tuple[str, ...] = (), want_refs: tuple[str, ...] = ()) -> bytes:
    """A v2 fetch request as git 2.x writes it."""
    return b"".join([
        pkt("command=fetch\n"), pkt("agent=git/2.39.5\n"), pkt("object-format=sha1\n"), DELIM,
        pkt("thin-pack\n"), pkt("ofs-delta\n"), *(pkt(f"want {want}\n") for want in wants),
        *(pkt(f"want-ref {ref}\n") for ref in want_refs), *(pkt(f"{arg}\n") for arg in args), pkt("done\n"), FLUSH,
    ])  # fmt: skip


def v0_fetch(*wants: str, args: tuple[str, ...] = ()) -> bytes:
    first, *rest = wants
    return b"".join([
        pkt(f"want {first} multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.39.5\n"),
        *(pkt(f"want {want}\n") for want in rest), *(pkt(f"{arg}\n") for arg in args), FLUSH, pkt("done\n"),
    ])  # fmt: skip


def v2_ls_refs() -> bytes:
    return pkt("command=ls-refs\n") + pkt("object-format=sha1\n") + DELIM + pkt("peel\n") + FLUSH


@pytest.fixture
def credential(fake_github: FakeGitHub) -> Credential:
    fake_github.add_token(TOKEN)
    return Credential("x-access-token", TOKEN, "static")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def make_mirror(tmp_path: Path, metrics: Metrics) -> AsyncIterator[Any]:
    mirrors: list[Mirror] = []

    def make(**settings: Any) -> Mirror:
        mirror = Mirror(MirrorConfig(dir=tmp_path / "mirror", **settings), None, metrics)
        mirrors.append(mirror)
        return mirror

    yield make
    for mirror in mirrors:
        await mirror.close()


@pytest.fixture
async def mirror(make_mirror: Any) -> Mirror:
    made: Mirror = make_mirror()
    return made


def repo_ref(full_name: str) -> str:
    """The repo as routing matches it (`Route.matched`): what the mirror is keyed by."""
    return f"github.com/{full_name}"


def upstream_url(fake: FakeGitHub, full_name: str) -> str:
    return f"{fake.url}/{full_name}.git"


def mirror_path(tmp_path: Path, full_name: str) -> Path:
    owner, name = full_name.lower().split("/")
    return tmp_path / "mirror" / "repos" / "github.com" / owner / f"{name}.git"


async def read_all(answer: MirrorAnswer) -> bytes:
    try:
        return b"".join([chunk async for chunk in answer.chunks])
    finally:
        await answer.close()


def pack_of_v2_answer(answer: bytes) -> bytes:
    """The packfile in a v2 fetch response: the sideband-1 payload after the `packfile` section header."""
    position, in_pack, pack = 0, False, bytearray()
    while position < len(answer):
        length = int(answer[position : position + 4], 16)
        payload = answer[position + 4 : position + length] if length > 4 else b""
        position += max(length, 4)
        if payload == b"packfile\n":
            in_pack = True
        elif in_pack and payload[:1] == b"\x01":
            pack += payload[1:]
    return bytes(pack)


def objects_in_pack(pack: bytes, scratch: Path) -> set[str]:
    """Indexes the pack in a scratch repo (which also verifies it) and lists its objects."""
    env = git_env(scratch / "home")
    repo = scratch / "unpacked.git"
    run_git_sync("init", "--quiet", "--bare", str(repo), env=env).check()
    (scratch / "answer.pack").write_bytes(pack)
    run_git_sync("index-pack", "-o", str(scratch / "answer.idx"), str(scratch / "answer.pack"), env=env).check()
    listed = run_git_sync("verify-pack", "-v", str(scratch / "answer.idx"), env=env).check().stdout
    return {line.split()[0] for line in listed.splitlines() if len(line.split()) > 2 and len(line.split()[0]) == 40}


def fetches(metrics: Metrics, result: str) -> float:
    return float(metrics.mirror_fetches.labels(result)._value.get())


# ---------------------------------------------------------------- the request parser


def test_parser_reads_v2_and_v0_wants_depth_and_filter() -> None:
    a, b = "a" * 40, "b" * 40
    v2 = parse_pack_request(v2_fetch(a, b, args=("deepen 1", "filter blob:none", f"shallow {b}")))
    assert (v2.version, v2.wants, v2.deepen, v2.filter, v2.shallow, v2.done) == (
        2, [a, b], "deepen 1", "blob:none", [b], True,
    )  # fmt: skip
    v0 = parse_pack_request(v0_fetch(a, b, args=("deepen 1", "filter blob:none")))
    assert (v0.version, v0.wants, v0.deepen, v0.filter, v0.done) == (0, [a, b], "deepen 1", "blob:none", True)
    assert parse_pack_request(v2_fetch(want_refs=("refs/heads/main",))).want_refs == ["refs/heads/main"]
    assert is_pack_request(v2_fetch(a)) and is_pack_request(v0_fetch(a)) and not is_pack_request(v2_ls_refs())


@pytest.mark.parametrize(
    "body",
    [
        v2_ls_refs(),
        b"",
        b"0032want " + b"z" * 40 + b"\n0000",
        b"0x10command=fetch",
        pkt("command=fetch\n") + pkt("object-format=sha256\n") + DELIM + pkt(f"want {'a' * 64}\n") + FLUSH,
        pkt("command=fetch\n") + DELIM + pkt("done\n") + FLUSH,  # no wants
        pkt("command=fetch\n") + DELIM + pkt("want-ref refs/../x\n") + FLUSH,
        pkt(f"have {'a' * 40}\n") + FLUSH,
        b"0032want " + b"a" * 40,  # truncated
    ],
)
def test_parser_refuses_what_a_mirror_should_not_answer(body: bytes) -> None:
    with pytest.raises(NotAPackRequest):
        parse_pack_request(body)


# ---------------------------------------------------------------- filling and serving


async def test_a_cold_request_fills_and_the_next_one_is_a_hit(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    head = fake_github.head("acme/app")
    url = upstream_url(fake_github, "acme/app")

    first = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential)
    assert first is not None and first.outcome == "filled"
    assert head in objects_in_pack(pack_of_v2_answer(await read_all(first)), tmp_path / "first")
    requests_after_fill, bytes_after_fill = fake_github.upload_pack_requests, fake_github.upload_pack_bytes
    assert requests_after_fill >= 1 and fetches(metrics, "ok") == 1

    second = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential)
    assert second is not None and second.outcome == "hit"
    assert head in objects_in_pack(pack_of_v2_answer(await read_all(second)), tmp_path / "second")
    # The hit first took upstream's refs of now (a fetch that found nothing new): the refs, and no pack.
    assert fake_github.upload_pack_requests == requests_after_fill + 1
    assert fake_github.upload_pack_bytes - bytes_after_fill < 1024
    assert fetches(metrics, "ok") == 2


async def test_a_want_the_mirror_lacks_is_fetched_first(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    old = fake_github.head("acme/app")
    url = upstream_url(fake_github, "acme/app")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(old), "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"
    await read_all(answer)

    new = fake_github.commit("acme/app", "new.txt", b"pushed behind the mirror's back\n")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(new), "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"
    assert new in objects_in_pack(pack_of_v2_answer(await read_all(answer)), tmp_path / "new")
    assert fetches(metrics, "ok") == 2

    # The old commit, no longer a tip anywhere, is still served (uploadpack.allowAnySHA1InWant).
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(old), "version=2", url, credential)
    assert answer is not None and answer.outcome == "hit"
    await read_all(answer)


async def test_a_commit_no_ref_reaches_is_left_to_upstream(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, tmp_path: Path
) -> None:
    """The mirror serves only what upstream's refs of now reach. A commit upstream holds under no ref is upstream's
    to give or refuse (it may be one being purged): the mirror neither fetches nor serves it."""
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    head = fake_github.head("acme/app")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential)
    assert answer is not None
    await read_all(answer)
    orphan = fake_github.commit("acme/app", "orphan.txt", b"on no branch\n")
    env = git_env(fake_github.root / "home")
    run_git_sync("update-ref", "refs/heads/main", head, env=env, cwd=fake_github.repo_path("acme/app")).check()

    assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(orphan), "version=2", url, credential) is None


async def test_a_commit_a_rewound_ref_left_behind_is_not_served(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics, tmp_path: Path
) -> None:
    """The mirror has the commit (it was a tip when it was fetched), but upstream's refs no longer reach it: each
    request takes upstream's refs first, so it is never served, whatever protocol version asks."""
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    base = fake_github.head("acme/app")
    secret = fake_github.commit("acme/app", "secret.txt", b"a key pushed by mistake\n")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(secret), "version=2", url, credential)
    assert answer is not None and secret in objects_in_pack(pack_of_v2_answer(await read_all(answer)), tmp_path / "a")
    fake_github.purge("acme/app", "main", base)

    assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(secret), "version=2", url, credential) is None
    assert await mirror.answer_pack(repo_ref("acme/app"), v0_fetch(secret), None, url, credential) is None
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(base), "version=2", url, credential)
    assert answer is not None and answer.outcome == "hit"  # what upstream's refs reach is still served
    await read_all(answer)
    await mirror.maintain_once()  # the prune: the commit leaves the mirror too
    assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(secret), "version=2", url, credential) is None
    missing = run_git_sync("cat-file", "-e", secret, env=git_env(fake_github.root / "home"),
                           cwd=next((tmp_path / "mirror").rglob("app.git")))  # fmt: skip
    assert missing.returncode != 0


@pytest.mark.parametrize("version", [2, 0])
async def test_a_shallow_boundary_upstream_no_longer_reaches_brings_nothing_purged(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, tmp_path: Path, version: int
) -> None:
    """The red team's second way to a purged commit: want a commit upstream still has, claim a shallow boundary
    past the purge (`shallow <S2>`), and deepen without bound: upload-pack "unshallows" S2 and sends its parents,
    S1 with the secret among them. Shallow ids must be reached by upstream's refs too."""
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    base = fake_github.head("acme/app")
    fake_github.commit("acme/app", "secret.txt", b"a key pushed by mistake\n")
    s2 = fake_github.commit("acme/app", "later.txt", b"and a commit on top\n")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(s2), "version=2", url, credential)
    assert answer is not None
    await read_all(answer)
    fake_github.purge("acme/app", "main", base)

    args = (f"shallow {s2}", "deepen 2147483647")
    body = v2_fetch(base, args=args) if version == 2 else v0_fetch(base, args=args)
    protocol = "version=2" if version == 2 else None
    assert await mirror.answer_pack(repo_ref("acme/app"), body, protocol, url, credential) is None  # upstream's


@pytest.mark.parametrize("version", [2, 0])
async def test_an_id_with_a_newline_cannot_end_the_reachability_check_early(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, version: int
) -> None:
    """Red team, round 4 again: `shallow <a reachable id>` with one newline too many, then `want <purged>`. The id
    passed a `$`-anchored check with its newline, and the empty line it made ended `git rev-list --stdin`'s list
    before the purged want: the mirror served the secret. Ids are whole lines of 40 hex or the request is not
    the mirror's to answer."""
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    base = fake_github.head("acme/app")
    secret = fake_github.commit("acme/app", "secret.txt", b"a key pushed by mistake\n")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(secret), "version=2", url, credential)
    assert answer is not None
    await read_all(answer)
    fake_github.purge("acme/app", "main", base)

    args = (f"shallow {base}\n",)  # pkt() adds the usual newline: this one is the extra
    body = v2_fetch(secret, args=args) if version == 2 else v0_fetch(secret, args=args)
    protocol = "version=2" if version == 2 else None
    assert await mirror.answer_pack(repo_ref("acme/app"), body, protocol, url, credential) is None  # upstream's


async def test_sixteen_concurrent_cold_requests_cause_one_upstream_fetch(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics
) -> None:
    fake_github.create_repo("acme/app", {**FILES, "blob.bin": os.urandom(2 << 20)})
    fake_github.git_bytes_per_second = 4 << 20  # the fetch lasts a while, so that all 16 arrive during it
    head = fake_github.head("acme/app")
    url = upstream_url(fake_github, "acme/app")

    answers = await asyncio.gather(*(
        mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential) for _ in range(16)
    ))  # fmt: skip
    assert all(answer is not None for answer in answers)
    bodies = await asyncio.gather(*(read_all(answer) for answer in answers if answer is not None))
    packs = {pack_of_v2_answer(body) for body in bodies}  # progress messages differ, packs do not
    assert len(packs) == 1 and next(iter(packs)).startswith(b"PACK")
    # The first request's fetch made the mirror; those that came during it share one more, for upstream's refs of
    # after their arrival (a burst costs at most two fetches, and one pack).
    assert fetches(metrics, "ok") <= 2
    refs_requests = [seen for seen in fake_github.seen if seen.path.endswith("/info/refs")]
    assert len(refs_requests) <= 2


async def test_a_client_that_goes_away_does_not_cancel_the_shared_fill(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics
) -> None:
    fake_github.create_repo("acme/app", {**FILES, "blob.bin": os.urandom(1 << 20)})
    fake_github.git_bytes_per_second = 2 << 20
    head = fake_github.head("acme/app")
    url = upstream_url(fake_github, "acme/app")
    body = v2_fetch(head)
    leaving = asyncio.create_task(mirror.answer_pack(repo_ref("acme/app"), body, "version=2", url, credential))
    staying = asyncio.create_task(mirror.answer_pack(repo_ref("acme/app"), body, "version=2", url, credential))
    # The fake says nothing when a request arrives but records it: poll until the fetch is under way.
    while not any(seen.path.endswith("/git-upload-pack") for seen in fake_github.seen):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    leaving.cancel()
    answer = await staying
    assert answer is not None and answer.outcome == "filled"
    await read_all(answer)
    assert leaving.cancelled() and fetches(metrics, "ok") == 1


async def test_requests_other_than_a_fetch_go_upstream(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    assert await mirror.answer_pack(repo_ref("acme/app"), v2_ls_refs(), "version=2", url, credential) is None
    assert await mirror.answer_pack(repo_ref("acme/app"), b"not pkt-lines", None, url, credential) is None
    head = fake_github.head("acme/app")
    # Only http(s) upstreams: a URL git would run a command for is never fetched from.
    assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), None, "ext::sh -c x", credential) is None
    assert not (tmp_path / "mirror" / "repos" / "github.com").exists()


async def test_wants_upstream_cannot_give_and_refusals_go_upstream(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics
) -> None:
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    unknown = "0123456789" * 4
    assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(unknown), "version=2", url, credential) is None
    assert fetches(metrics, "ok") == 1  # the mirror was made; upstream just does not have that object

    # Asked again at once, an id upstream lacks costs no further fetch: the request just goes upstream.
    again = "9876543210" * 4
    assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(again), "version=2", url, credential) is None
    assert fetches(metrics, "ok") == 1 and fetches(metrics, "failed") == 0

    fake_github.create_repo("acme/other", FILES)
    other = upstream_url(fake_github, "acme/other")
    first = await mirror.answer_pack(repo_ref("acme/other"), v2_fetch(fake_github.head("acme/other")),
                                     "version=2", other, credential)  # fmt: skip
    assert first is not None
    await first.close()
    del fake_github.grants[TOKEN]  # revoked: the fetch a new commit needs fails
    new = fake_github.commit("acme/other", "new.txt", b"new\n")
    assert await mirror.answer_pack(repo_ref("acme/other"), v2_fetch(new), "version=2", other, credential) is None
    assert fetches(metrics, "failed") == 1


async def test_repos_outside_mirror_repos_are_not_covered(make_mirror: Any) -> None:
    mirror: Mirror = make_mirror(repos=[r"github\.com/acme/app"])
    assert mirror.covers(repo_ref("acme/app")) and mirror.covers(repo_ref("Acme/App"))
    assert not mirror.covers(repo_ref("acme/app-secrets")) and not mirror.covers(repo_ref("other/app"))
    assert make_mirror().covers(repo_ref("anyone/anything"))


async def test_an_unusable_mirror_directory_means_bypass(
    fake_github: FakeGitHub, credential: Credential, tmp_path: Path, metrics: Metrics
) -> None:
    fake_github.create_repo("acme/app", FILES)
    (tmp_path / "not-a-dir").write_text("a file where the mirror directory should be\n")
    mirror = Mirror(MirrorConfig(dir=tmp_path / "not-a-dir"), None, metrics)
    try:
        head = fake_github.head("acme/app")
        url = upstream_url(fake_github, "acme/app")
        assert await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential) is None
    finally:
        await mirror.close()


async def test_want_ref_refreshes_the_mirror_first(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    body = v2_fetch(want_refs=("refs/heads/main",))
    answer = await mirror.answer_pack(repo_ref("acme/app"), body, "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"
    assert fake_github.head("acme/app") in objects_in_pack(pack_of_v2_answer(await read_all(answer)), tmp_path)


# ---------------------------------------------------------------- integrity


async def test_a_mirror_without_its_packs_is_filled_again(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    head = fake_github.head("acme/app")
    url = upstream_url(fake_github, "acme/app")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential)
    assert answer is not None
    await read_all(answer)
    packs = list((mirror_path(tmp_path, "acme/app") / "objects" / "pack").iterdir())
    assert packs
    for pack in packs:
        pack.unlink()

    # git cat-file sees the wants gone; the fetch that follows brings everything back.
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(head), "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"
    assert head in objects_in_pack(pack_of_v2_answer(await read_all(answer)), tmp_path / "refilled")


async def test_a_mirror_missing_history_bypasses_once_and_is_rebuilt(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, metrics: Metrics, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    first = fake_github.head("acme/app")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(first), "version=2", url, credential)
    assert answer is not None
    await read_all(answer)
    pack_dir = mirror_path(tmp_path, "acme/app") / "objects" / "pack"
    old_packs = set(pack_dir.iterdir())
    second = fake_github.commit("acme/app", "second.txt", b"second\n")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(second), "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"
    await read_all(answer)
    for pack in old_packs:  # the first commit's objects: the tip is still there, its history is not
        pack.unlink()

    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(second), "version=2", url, credential)
    assert answer is None  # upload-pack failed before any pack data: this request goes upstream

    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(second), "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"  # moved aside by fsck, and built again
    assert {first, second} <= objects_in_pack(pack_of_v2_answer(await read_all(answer)), tmp_path / "rebuilt")
    env = git_env(tmp_path / "home")
    run_git_sync("fsck", "--connectivity-only", env=env, cwd=mirror_path(tmp_path, "acme/app")).check()


async def test_lock_files_of_an_interrupted_fetch_do_not_block_the_next_one(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", FILES)
    url = upstream_url(fake_github, "acme/app")
    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(fake_github.head("acme/app")),
                                      "version=2", url, credential)  # fmt: skip
    assert answer is not None
    await read_all(answer)
    repo = mirror_path(tmp_path, "acme/app")
    for lock in (repo / "refs" / "heads" / "main.lock", repo / "packed-refs.lock"):
        lock.write_text("left by a killed git\n")
        os.utime(lock, (1_000_000_000, 1_000_000_000))
    new = fake_github.commit("acme/app", "after.txt", b"after the crash\n")

    answer = await mirror.answer_pack(repo_ref("acme/app"), v2_fetch(new), "version=2", url, credential)
    assert answer is not None and answer.outcome == "filled"
    await read_all(answer)


# ---------------------------------------------------------------- eviction


async def test_max_size_holds_across_three_repos_and_spares_the_one_being_read(
    fake_github: FakeGitHub, credential: Credential, make_mirror: Any, metrics: Metrics, tmp_path: Path
) -> None:
    for name in ("one", "two", "three"):
        fake_github.create_repo(f"acme/{name}", {"blob.bin": os.urandom(300 * 1024)})
    mirror: Mirror = make_mirror(max_size=700 * 1024)  # room for two of them

    async def serve(name: str) -> MirrorAnswer:
        url = upstream_url(fake_github, f"acme/{name}")
        head = fake_github.head(f"acme/{name}")
        answer = await mirror.answer_pack(repo_ref(f"acme/{name}"), v2_fetch(head), "version=2", url, credential)
        assert answer is not None
        return answer

    for name in ("one", "two", "three"):
        await read_all(await serve(name))
    await mirror.maintain_once()
    assert not mirror_path(tmp_path, "acme/one").exists()  # the least recently used
    assert mirror_path(tmp_path, "acme/two").exists() and mirror_path(tmp_path, "acme/three").exists()
    assert metrics.mirror_evictions._value.get() == 1
    assert 0 < metrics.mirror_disk_bytes._value.get() <= 700 * 1024

    # "two" becomes the least recently used while it is being read: "three" goes instead.
    reading = await serve("two")
    await read_all(await serve("three"))
    await read_all(await serve("one"))
    await mirror.maintain_once()
    assert mirror_path(tmp_path, "acme/two").exists() and mirror_path(tmp_path, "acme/one").exists()
    assert not mirror_path(tmp_path, "acme/three").exists()
    assert metrics.mirror_evictions._value.get() == 2
    assert metrics.mirror_disk_bytes._value.get() <= 700 * 1024
    assert b"PACK" in await read_all(reading)


# ---------------------------------------------------------------- the credential


async def test_the_token_never_reaches_disk_or_a_command_line(
    fake_github: FakeGitHub, credential: Credential, mirror: Mirror, tmp_path: Path
) -> None:
    fake_github.create_repo("acme/app", {**FILES, "blob.bin": os.urandom(1 << 20)})
    fake_github.git_bytes_per_second = 1 << 20  # a second or so of fetch, to look at the processes during it
    head = fake_github.head("acme/app")
    url = upstream_url(fake_github, "acme/app")
    secrets = [TOKEN.encode(), credential.authorization.encode(), base64.b64encode(TOKEN.encode())]

    body = v2_fetch(head)
    filling = asyncio.create_task(mirror.answer_pack(repo_ref("acme/app"), body, "version=2", url, credential))
    seen_git = False
    while not filling.done():
        for command_line in _command_lines():
            seen_git |= b"git" in command_line and url.encode() in command_line
            assert not any(secret in command_line for secret in secrets)
        await asyncio.sleep(0.005)
    answer = await filling
    assert answer is not None
    await read_all(answer)
    assert seen_git  # the fetch's command line was looked at

    for path in (tmp_path / "mirror").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(secret in content for secret in secrets), path


def _command_lines() -> list[bytes]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                lines.append((entry / "cmdline").read_bytes())
    return lines


# ---------------------------------------------------------------- real git clients


class MiniForward:
    """The smallest forward that uses the mirror: refs from upstream with the token, packs from `answer_pack`.
    Enough to run real git clients (v0, v2, shallow, partial) against the mirror; the proxy's own forward is
    tested in tests/e2e/test_mirror.py."""

    def __init__(self, fake: FakeGitHub, mirror: Mirror, credential: Credential) -> None:
        self.fake, self.mirror, self.credential = fake, mirror, credential
        self.outcomes: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{owner}/{repo}/{endpoint:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        owner, repo = request.match_info["owner"], request.match_info["repo"].removesuffix(".git")
        raw = await request.read()
        if request.match_info["endpoint"] == "git-upload-pack":
            body = zlib.decompress(raw, wbits=31) if request.headers.get("Content-Encoding") == "gzip" else raw
            answer = await self.mirror.answer_pack(
                f"github.com/{owner}/{repo}", body, request.headers.get("Git-Protocol"),
                f"{self.fake.url}/{owner}/{repo}.git", self.credential,
            )  # fmt: skip
            if not body.startswith(b"0014command=ls-refs"):  # refs always come from upstream: not a bypass
                self.outcomes.append(answer.outcome if answer else "bypass")
            if answer is not None:
                response = web.StreamResponse(headers={"Content-Type": "application/x-git-upload-pack-result"})
                await response.prepare(request)
                try:
                    async for chunk in answer.chunks:
                        await response.write(chunk)
                finally:
                    await answer.close()
                await response.write_eof()
                return response
        return await self._upstream(request, raw)

    async def _upstream(self, request: web.Request, raw: bytes) -> web.Response:
        headers = {name: value for name, value in request.headers.items()
                   if name in ("Content-Type", "Content-Encoding", "Git-Protocol", "Accept")}  # fmt: skip
        headers["Authorization"] = self.credential.authorization
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.request(
            request.method, f"{self.fake.url}{request.rel_url}", headers=headers, data=raw or None
        ) as upstream:  # fmt: skip
            return web.Response(status=upstream.status, body=await upstream.read(),
                                content_type=upstream.content_type)  # fmt: skip


@pytest.fixture
async def forward(fake_github: FakeGitHub, mirror: Mirror, credential: Credential) -> AsyncIterator[MiniForward]:
    mini = MiniForward(fake_github, mirror, credential)
    await mini.start()
    yield mini
    await mini.close()


@pytest.mark.parametrize(
    "options",
    [
        ("-c", "protocol.version=2"),
        ("-c", "protocol.version=0"),
        ("-c", "protocol.version=2", "--depth", "1"),
        ("-c", "protocol.version=0", "--depth", "1"),
        ("-c", "protocol.version=2", "--filter=blob:none"),
        ("-c", "protocol.version=0", "--filter=blob:none"),
    ],
    ids=["v2", "v0", "v2-depth", "v0-depth", "v2-filter", "v0-filter"],
)
async def test_real_clones_are_served_from_the_mirror(
    fake_github: FakeGitHub, forward: MiniForward, git: Git, tmp_path: Path, options: tuple[str, ...]
) -> None:
    fake_github.create_repo("acme/app", FILES)
    fake_github.commit("acme/app", "second.txt", b"a second commit, so that depth 1 means something\n")
    url = f"{forward.url}/acme/app.git"
    config, clone_options = options[:2], options[2:]

    for attempt in ("cold", "warm"):
        await git(*config, "clone", "--quiet", *clone_options, url, f"app-{attempt}")
        checkout = tmp_path / "work" / f"app-{attempt}"
        assert (checkout / "second.txt").read_bytes().startswith(b"a second commit")
        await git("fsck", "--connectivity-only", cwd=checkout)
        shallow = (checkout / ".git" / "shallow").exists()
        assert shallow == ("--depth" in clone_options)
    assert "bypass" not in forward.outcomes and "hit" in forward.outcomes and "filled" in forward.outcomes
    if "--filter=blob:none" in clone_options:  # the checkout's blobs came later, from the mirror too
        assert len(forward.outcomes) > 2


async def test_a_repeat_clone_takes_almost_nothing_from_upstream(
    fake_github: FakeGitHub, forward: MiniForward, git: Git
) -> None:
    fake_github.create_repo("acme/app", {**FILES, "blob.bin": os.urandom(1 << 20)})
    url = f"{forward.url}/acme/app.git"
    await git("clone", "--quiet", "--bare", url, "first.git")
    before = fake_github.upload_pack_bytes
    await git("clone", "--quiet", "--bare", url, "second.git")
    assert forward.outcomes == ["filled", "hit"]
    assert fake_github.upload_pack_bytes - before < 10_000  # the ls-refs answer only
