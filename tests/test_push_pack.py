"""The pack reader on real packs from `git pack-objects` (thin or not, offset or ref deltas), and on broken ones."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from proxy.push.delta import DeltaError, DeltaTooLarge, DeltaTooLong, apply_delta
from proxy.push.pack import BLOB, COMMIT, OFS_DELTA, TREE, MalformedPack, PackScanner, commit_parents, tag_target
from proxy.push.pack import PackTooCostly as TooCostly
from proxy.testing import git_env


class Repo:
    """A throwaway repo driven by the real git CLI, to make real commits and real packs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = git_env(path.parent / "home")
        self.git("init", "--quiet", "--initial-branch=main", str(path), cwd=path.parent)

    def git(self, *args: str, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
        done = subprocess.run(["git", *args], cwd=cwd or self.path, env=self.env, input=stdin, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout

    def commit(self, name: str, content: bytes = b"x\n", message: str | None = None) -> str:
        (self.path / name).write_bytes(content)
        self.git("add", name)
        (self.path.parent / "message").write_text(message or f"add {name}")
        self.git("commit", "--quiet", "--allow-empty", "-F", str(self.path.parent / "message"))
        return self.head()

    def empty_commits(self, count: int, message_size: int) -> str:
        """`count` commits on HEAD with the same tree and incompressible messages, made by one fast-import."""
        parent, stream = self.head(), bytearray()
        for index in range(count):
            message = os.urandom(message_size // 2).hex().encode()
            stream += b"commit refs/heads/main\nmark :%d\ncommitter c <c> 0 +0000\n" % (index + 1)
            stream += b"data %d\n%s\n" % (len(message), message)
            stream += (b"from %s\n\n" % parent.encode()) if index == 0 else b"\n"
        self.git("fast-import", "--quiet", "--force", stdin=bytes(stream))
        self.git("reset", "--quiet", "--hard", "main")
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").decode().strip()

    def pack(self, *revs: str, thin: bool = False, offsets: bool = True, window: int = 10) -> bytes:
        """What send-pack sends: `pack-objects --revs` with the new tips and `^` the tips the other side has
        (`--all`: every ref)."""
        args = ["pack-objects", "--stdout", "--revs", f"--window={window}", *(r for r in revs if r == "--all")]
        revs = tuple(r for r in revs if r != "--all")
        args += ["--thin"] if thin else []
        args += ["--delta-base-offset"] if offsets else []
        return self.git(*args, stdin="".join(f"{rev}\n" for rev in revs).encode())

    def parents(self, *revs: str) -> dict[str, tuple[str, ...]]:
        listed = self.git("rev-list", "--parents", *revs).decode().split("\n")
        return {line.split()[0]: tuple(line.split()[1:]) for line in listed if line}


def scan(pack: bytes, chunk: int) -> PackScanner:
    scanner = PackScanner()
    for start in range(0, len(pack), chunk):
        scanner.feed(pack[start : start + chunk])
    scanner.finish()
    return scanner


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo")


@pytest.mark.parametrize("thin", [False, True])
@pytest.mark.parametrize("offsets", [False, True])
def test_commits_and_parents_of_real_packs_whatever_the_chunking(repo: Repo, thin: bool, offsets: bool) -> None:
    base = repo.commit("a.txt", b"base\n" * 100)
    repo.commit("b.bin", bytes(range(256)) * 400)
    repo.git("checkout", "--quiet", "-b", "side", base)
    repo.commit("a.txt", b"base\n" * 100 + b"side\n")
    repo.git("checkout", "--quiet", "main")
    repo.git("merge", "--quiet", "--no-edit", "side")
    tip = repo.head()
    pack = repo.pack(tip, f"^{base}", thin=thin, offsets=offsets)
    expected = repo.parents(tip, f"^{base}")
    assert len(expected) == 3
    for chunk in (1, 5, 4096, len(pack)):
        scanner = scan(pack, chunk)
        assert scanner.done and scanner.past_commits
        assert scanner.known.commits == expected


def test_deltas_of_commits_and_tags_are_resolved(repo: Repo) -> None:
    message = "a long message that makes deltas worth it " * 40
    for index in range(12):
        repo.commit("f", str(index).encode(), f"{message}{index}")
    repo.git("tag", "-a", "-m", f"{message} one", "v1")
    repo.git("tag", "-a", "-m", f"{message} two", "v2", "HEAD~3")
    for offsets in (True, False):
        pack = repo.pack("--all", offsets=offsets, window=50)
        written = Path(repo.path.parent / f"check-{offsets}.pack")
        written.write_bytes(pack)
        repo.git("index-pack", str(written))
        listing = repo.git("verify-pack", "-v", str(written.with_suffix(".idx"))).decode().splitlines()
        deltas = [line.split() for line in listing if line.split()[1:2] in (["commit"], ["tag"])]
        assert sum(len(fields) == 7 for fields in deltas) >= 5  # objects stored as deltas of others
        scanner = scan(pack, 333)
        assert scanner.known.commits == repo.parents("--all")
        tags = repo.git("for-each-ref", "--format=%(objectname) %(*objectname)", "refs/tags").decode().split()
        assert scanner.known.tags == {tags[0]: (tags[1], "commit"), tags[2]: (tags[3], "commit")}


def test_a_huge_commit_is_hashed_whole_and_its_parents_read_from_its_start(repo: Repo) -> None:
    first = repo.commit("a")
    huge = repo.commit("b", message="m" * (3 << 20))
    scanner = scan(repo.pack(huge, f"^{first}"), 65536)
    assert scanner.known.commits == {huge: (first,)}


def test_an_empty_pack_and_the_first_tree_marks_the_end_of_the_commits(repo: Repo) -> None:
    tip = repo.commit("a")
    empty = scan(repo.pack(tip, f"^{tip}"), 7)
    assert empty.done and not empty.known.commits and not empty.past_commits
    scanner = PackScanner()
    pack = repo.pack(tip)
    scanner.feed(pack[:40])  # the header and part of the commit
    assert not scanner.past_commits
    scanner.feed(pack[40:])
    assert scanner.past_commits


# ---------------------------------------------------------------- broken packs, built by hand


def entry_header(kind: int, size: int) -> bytes:
    out = bytearray([(kind << 4) | (size & 15) | (0x80 if size > 15 else 0)])
    size >>= 4
    while size:
        out.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
    return bytes(out)


def raw_pack(*entries: bytes, count: int | None = None, version: int = 2) -> bytes:
    body = b"PACK" + version.to_bytes(4, "big") + (len(entries) if count is None else count).to_bytes(4, "big")
    body += b"".join(entries)
    return body + hashlib.sha1(body).digest()


COMMIT_TEXT = b"tree " + b"4b825dc642cb6eb9a060e54bf8d69288fbee4904" + b"\nauthor a <a> 0 +0000\n\nm\n"


@pytest.mark.parametrize(
    ("pack", "problem"),
    [
        (b"PACX" + bytes(8) + bytes(20), "not a version 2 or 3 pack"),
        (raw_pack(version=4), "not a version 2 or 3 pack"),
        (raw_pack(entry_header(5, 1) + zlib.compress(b"x")), "unknown type 5"),
        (raw_pack(entry_header(COMMIT, 5) + zlib.compress(b"abc")), "smaller than its header says"),
        (raw_pack(entry_header(BLOB, 2) + zlib.compress(b"abc")), "larger than its header says"),
        (raw_pack(entry_header(BLOB, 3) + zlib.compress(b"abc")[:-4] + b"\xff\xff\xff\xff"), "corrupt"),
        (raw_pack(entry_header(OFS_DELTA, 3) + b"\x7f" + zlib.compress(b"abc")), "base lies outside the pack"),
        (raw_pack(entry_header(BLOB, 3) + zlib.compress(b"abc"), count=2), "corrupt"),  # the trailer read as one
        (raw_pack(entry_header(BLOB, 3) + zlib.compress(b"abc"))[:-5], "the push ended inside its pack"),
        (raw_pack(entry_header(TREE, 1 << 70)), r"an object size over 2\^64"),
    ],
)
def test_broken_packs_are_refused(pack: bytes, problem: str) -> None:
    with pytest.raises(MalformedPack, match=problem):
        scan(pack, 3)


def test_a_hand_built_pack_with_a_delta_commit_and_a_bogus_one() -> None:
    base = COMMIT_TEXT
    base_id = hashlib.sha1(b"commit %d\0" % len(base) + base).hexdigest()
    child = base.replace(b"\nauthor", b"\nparent " + base_id.encode() + b"\nauthor")
    delta = _delta(base, child)
    first = entry_header(COMMIT, len(base)) + zlib.compress(base)
    second = entry_header(OFS_DELTA, len(delta)) + bytes([len(first)]) + zlib.compress(delta)
    bogus = b"not a commit"
    third = entry_header(COMMIT, len(bogus)) + zlib.compress(bogus)
    scanner = scan(raw_pack(first, second, third), 2)
    child_id = hashlib.sha1(b"commit %d\0" % len(child) + child).hexdigest()
    assert scanner.known.commits == {base_id: (), child_id: (base_id,)}
    assert scanner.known.unreadable == {hashlib.sha1(b"commit 12\0" + bogus).hexdigest()}


def test_a_pack_that_costs_too_much_to_read_is_not_read_to_its_end() -> None:
    """A zlib bomb (a blob of zeros inflates a thousandfold) and a delta of one-byte copies, each a step of
    Python: past the scanner's budgets, it stops, whatever is left."""
    zeros = 4 << 20
    bomb = raw_pack(entry_header(BLOB, zeros) + zlib.compress(bytes(zeros), 9))
    assert len(bomb) < 8 << 10
    with pytest.raises(TooCostly, match="inflates to more than 1 MiB"):
        scan_with(PackScanner(max_inflated=1 << 20), bomb)
    scan_with(PackScanner(), bomb)  # within the default budget, the same pack is read

    base = COMMIT_TEXT
    copies = _varint(len(base)) + _varint(1000) + bytes([0x90, 1]) * 1000  # one byte per instruction
    first = entry_header(COMMIT, len(base)) + zlib.compress(base)
    deltas = [entry_header(OFS_DELTA, len(copies)) + _ofs(len(first)) + zlib.compress(copies)]
    with pytest.raises(TooCostly, match="more than 100 instructions"):
        scan_with(PackScanner(max_delta_steps=100), raw_pack(first, *deltas))
    scan_with(PackScanner(max_delta_steps=1000), raw_pack(first, *deltas))


def scan_with(scanner: PackScanner, pack: bytes) -> PackScanner:
    for start in range(0, len(pack), 4096):
        scanner.feed(pack[start : start + 4096])
    scanner.finish()
    return scanner


def _ofs(distance: int) -> bytes:
    """An OFS_DELTA's distance: big-endian base-128, each continuation adding one."""
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.insert(0, 0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(out)


def _delta(base: bytes, result: bytes) -> bytes:
    """A delta that copies the base's first 46 bytes (its tree line) and inserts the rest."""
    rest = result[46:]
    inserts = b"".join(bytes([len(rest[i : i + 127])]) + rest[i : i + 127] for i in range(0, len(rest), 127))
    return _varint(len(base)) + _varint(len(result)) + bytes([0x80 | 0x10, 46]) + inserts


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


# ---------------------------------------------------------------- git's rules for commits, tags and deltas


def test_parents_are_only_the_lines_right_after_the_tree_as_git_reads_them() -> None:
    tree, one, two = "4b825dc642cb6eb9a060e54bf8d69288fbee4904", "1" * 40, "ab" * 20
    text = f"tree {tree}\nparent {one}\nparent {two.upper()}\nauthor a <a> 0 +0000\nparent {'3' * 40}\n\nm\n"
    assert commit_parents(text.encode()) == (one, two)
    assert commit_parents(f"tree {tree}\n\nm".encode()) == ()
    assert commit_parents(f"author x\ntree {tree}\n".encode()) is None
    assert commit_parents(f"tree {tree}\nparent {one[:39]}\n".encode()) is None
    assert commit_parents(f"tree {tree}\nparent {one}\n".encode()[:60], whole=False) is None  # cut off in a parent
    assert tag_target(f"object {one}\ntype commit\ntag v1\n".encode()) == (one, "commit")
    assert tag_target(f"object {one}\ntype thing\n".encode()) is None
    assert tag_target(b"object short\ntype commit\n") is None


def test_delta_application_and_its_refusals() -> None:
    base = b"0123456789"
    assert apply_delta(base, bytes([10, 7, 0x91, 2, 4, 3]) + b"abc", 100, 10) == (b"2345abc", 2)
    one_copy = _varint(0x10000) + _varint(0x10000) + bytes([0x80])
    assert apply_delta(b"x" * 0x10000, one_copy, 1 << 20, 10) == (b"x" * 0x10000, 1)
    with pytest.raises(DeltaTooLong):
        apply_delta(base, bytes([10, 7, 0x91, 2, 4, 3]) + b"abc", 100, 1)
    with pytest.raises(DeltaError, match="applied to"):
        apply_delta(base, bytes([9, 1, 1]) + b"a", 100, 10)
    with pytest.raises(DeltaError, match="past the end of the base"):
        apply_delta(base, bytes([10, 5, 0x91, 8, 5]), 100, 10)
    with pytest.raises(DeltaError, match="reserved instruction"):
        apply_delta(base, bytes([10, 1, 0]), 100, 10)
    with pytest.raises(DeltaError, match="insert past the end"):
        apply_delta(base, bytes([10, 3, 3]) + b"a", 100, 10)
    with pytest.raises(DeltaError, match="makes less"):
        apply_delta(base, bytes([10, 3, 1]) + b"a", 100, 10)
    with pytest.raises(DeltaError, match="makes more"):
        apply_delta(base, bytes([10, 1, 2]) + b"ab", 100, 10)
    with pytest.raises(DeltaError, match="cut short"):
        apply_delta(base, bytes([10, 1, 0x91]), 100, 10)
    with pytest.raises(DeltaTooLarge):
        apply_delta(base, bytes([10, 101, 1]) + b"a", 100, 10)
