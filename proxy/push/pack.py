"""Reads a pushed pack as it arrives, for its commits only: their ids and parents, never holding a blob."""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, field
from enum import Enum

from .delta import DeltaError, DeltaTooLarge, DeltaTooLong, apply_delta

COMMIT, TREE, BLOB, TAG, OFS_DELTA, REF_DELTA = 1, 2, 3, 4, 6, 7
_TYPE_NAMES = {COMMIT: b"commit", TREE: b"tree", BLOB: b"blob", TAG: b"tag"}
MAX_KEPT_OBJECT = 1 << 20  # a commit or tag kept whole (to parse it, and as a delta base) up to this size
MAX_KEPT_TOTAL = 32 << 20  # all of them together, per push; past it, new ones are parsed but not kept as bases
MAX_COMMITS = 200_000  # commits whose parents are remembered (and tags whose targets are), per push
# What reading one push may cost, whatever its pack: zlib inflates up to about 1000 bytes per byte sent, and a
# delta of tiny copy instructions is a step of Python for each. A real push stays far below both.
MAX_INFLATED = 4 << 30  # bytes inflated (entries and delta results) per push: a few seconds of zlib
MAX_DELTA_STEPS = 2_000_000  # delta instructions applied per push: about a second of Python
_PREFIX = 64 << 10  # of a larger commit only the start is kept: its parents come right after its tree
_CHUNK = 64 << 10  # inflated bytes per step: a blob passes through in pieces this size, and is dropped
_HEX = re.compile(rb"[0-9a-fA-F]{40}")  # git's get_oid_hex takes either case


class MalformedPack(ValueError):
    """A pack that index-pack would refuse too, or one built to make this reader misjudge it."""


class PackTooCostly(Exception):
    """A pack that takes more than MAX_INFLATED or MAX_DELTA_STEPS to read: perhaps valid, but not checked."""


class _State(Enum):
    HEADER = "header"
    ENTRY = "entry"
    DATA = "data"
    TRAILER = "trailer"
    DONE = "done"


@dataclass
class KnownObjects:
    """What the pack says of its commits and tags so far. An object absent here is one the pack does not have
    (yet), or that cannot be seen without upstream (a delta against a base only upstream has)."""

    commits: dict[str, tuple[str, ...]] = field(default_factory=dict)  # id -> parents
    tags: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (object, its type)
    unreadable: set[str] = field(default_factory=set)  # commits and tags git itself could not parse


@dataclass
class _Entry:
    start: int
    type: int
    size: int
    base: _Kept | None = None  # a delta whose base is a kept commit or tag
    wanted: bool = False  # output kept (commit, tag, or a delta that resolves to one)
    produced: int = 0
    chunks: list[bytes] = field(default_factory=list)
    hasher: hashlib._Hash | None = None


@dataclass(frozen=True)
class _Kept:
    type: int
    content: bytes


class PackScanner:
    """Sans-IO: `feed` it the pack's bytes as they come. Each entry is inflated with its own zlib stream, whose end
    (`unused_data`) is where the next entry starts; only commits and tags (and deltas against them) are kept."""

    def __init__(self, max_inflated: int = MAX_INFLATED, max_delta_steps: int = MAX_DELTA_STEPS) -> None:
        self.known = KnownObjects()
        self.max_inflated, self.max_delta_steps = max_inflated, max_delta_steps
        self.past_commits = False  # a tree or blob arrived: git writes every commit before them
        self._state = _State.HEADER
        self._pending = b""  # bytes of a header not yet whole
        self._offset = 0  # where `_pending` starts in the pack
        self._remaining = 0  # entries still to come
        self._entry: _Entry | None = None
        self._inflater = zlib.decompressobj()
        self._kept_by_offset: dict[int, _Kept] = {}
        self._kept_by_id: dict[str, _Kept] = {}
        self._kept_bytes = 0
        self._inflated = 0
        self._delta_steps = 0

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, data: bytes) -> None:
        while data and self._state is not _State.DONE:
            data = self._inflate(data) if self._state is _State.DATA else self._parse_header(self._pending + data)

    def finish(self) -> None:
        """The body ended: a pack cut short is refused (index-pack would refuse it too)."""
        if self._state is not _State.DONE:
            raise MalformedPack("the push ended inside its pack")

    # ------------------------------------------------------------ headers

    def _parse_header(self, data: bytes) -> bytes:
        """Consumes one header (pack, entry or trailer) from `data` if it is whole; returns what follows it."""
        parsed = {_State.HEADER: self._pack_header, _State.ENTRY: self._entry_header, _State.TRAILER: self._trailer}
        used = parsed[self._state](data)
        if used is None:
            if len(data) > 64:
                raise MalformedPack("an entry header that never ends")
            self._pending = data
            return b""
        self._pending = b""
        self._offset += used
        return data[used:]

    def _pack_header(self, data: bytes) -> int | None:
        if len(data) < 12:
            return None
        if data[:4] != b"PACK" or int.from_bytes(data[4:8], "big") not in (2, 3):
            raise MalformedPack("not a version 2 or 3 pack")
        self._remaining = int.from_bytes(data[8:12], "big")
        self._state = _State.ENTRY if self._remaining else _State.TRAILER
        return 12

    def _entry_header(self, data: bytes) -> int | None:
        if not data:
            return None
        kind, size, position = (data[0] >> 4) & 7, data[0] & 15, 1
        shift, byte = 4, data[0]
        while byte & 0x80:
            if position >= len(data):
                return None
            if shift > 60:
                raise MalformedPack("an object size over 2^64")
            byte = data[position]
            size |= (byte & 0x7F) << shift
            shift, position = shift + 7, position + 1
        if kind not in (COMMIT, TREE, BLOB, TAG, OFS_DELTA, REF_DELTA):
            raise MalformedPack(f"an object of unknown type {kind}")
        entry = _Entry(self._offset, kind, size)
        if kind == OFS_DELTA:
            parsed = _offset_varint(data, position)
            if parsed is None:
                return None
            distance, position = parsed
            if not 0 < distance <= entry.start:
                raise MalformedPack("a delta whose base lies outside the pack")
            entry.base = self._kept_by_offset.get(entry.start - distance)
        elif kind == REF_DELTA:
            if len(data) < position + 20:
                return None
            entry.base = self._kept_by_id.get(data[position : position + 20].hex())
            position += 20
        self._begin(entry)
        return position

    def _begin(self, entry: _Entry) -> None:
        if entry.type in (COMMIT, TAG):
            entry.wanted = True
            header = _TYPE_NAMES[entry.type] + b" %d\0" % entry.size
            entry.hasher = hashlib.sha1(header, usedforsecurity=False)
        elif entry.base is not None:
            entry.wanted = entry.size <= MAX_KEPT_OBJECT  # a delta, applied once whole
        # Trees, blobs and deltas against them: git's packs put them after every commit (pack-objects' write
        # order), so the commits are likely all in by now.
        self.past_commits |= entry.type in (TREE, BLOB) or (entry.type in (OFS_DELTA, REF_DELTA) and not entry.base)
        self._entry = entry
        self._inflater = zlib.decompressobj()
        self._state = _State.DATA

    def _trailer(self, data: bytes) -> int | None:
        if len(data) < 20:
            return None
        self._state = _State.DONE
        return 20

    # ------------------------------------------------------------ entry data

    def _inflate(self, data: bytes) -> bytes:
        """Inflates the current entry; returns the bytes after its zlib stream once it ended, else b""."""
        entry, inflater = self._entry, self._inflater
        assert entry is not None
        while True:
            try:
                out = inflater.decompress(data, _CHUNK)
            except zlib.error:
                raise MalformedPack("an entry whose zlib stream is corrupt") from None
            # At the stream's end, the rest of `data` is in both unused_data and unconsumed_tail.
            rest = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            self._offset += len(data) - len(rest)
            entry.produced += len(out)
            if entry.produced > entry.size:
                raise MalformedPack("an entry larger than its header says")
            self._spend_inflated(len(out))
            self._take(entry, out)
            if inflater.eof:
                self._end(entry)
                return inflater.unused_data
            data = inflater.unconsumed_tail
            if not data and len(out) < _CHUNK:
                return b""

    def _take(self, entry: _Entry, out: bytes) -> None:
        if not entry.wanted or not out:
            return
        if entry.hasher is not None:
            entry.hasher.update(out)
            kept = sum(map(len, entry.chunks))
            if entry.size > MAX_KEPT_OBJECT and kept >= _PREFIX:
                return  # a huge commit: its id is hashed in full, its parents read from the start
        entry.chunks.append(out)

    def _end(self, entry: _Entry) -> None:
        if entry.produced != entry.size:
            raise MalformedPack("an entry smaller than its header says")
        self._entry = None
        self._remaining -= 1
        self._state = _State.ENTRY if self._remaining else _State.TRAILER
        if not entry.wanted:
            return
        content = b"".join(entry.chunks)
        if entry.hasher is not None:
            self._record(entry.start, entry.type, entry.hasher.hexdigest(), content, whole=entry.size == len(content))
            return
        assert entry.base is not None
        try:
            steps_left = self.max_delta_steps - self._delta_steps
            result, steps = apply_delta(entry.base.content, content, MAX_KEPT_OBJECT, steps_left)
        except DeltaTooLarge:
            return  # a commit over MAX_KEPT_OBJECT made from a delta: unseen, so never taken as proof
        except DeltaTooLong:
            raise PackTooCostly(f"its deltas take more than {self.max_delta_steps} instructions to apply") from None
        except DeltaError as error:
            raise MalformedPack(f"a delta that cannot be applied: {error}") from None
        self._delta_steps += steps
        self._spend_inflated(len(result))
        header = _TYPE_NAMES[entry.base.type] + b" %d\0" % len(result)
        object_id = hashlib.sha1(header + result, usedforsecurity=False).hexdigest()
        self._record(entry.start, entry.base.type, object_id, result, whole=True)

    def _spend_inflated(self, size: int) -> None:
        self._inflated += size
        if self._inflated > self.max_inflated:
            raise PackTooCostly(f"it inflates to more than {self.max_inflated >> 20} MiB")

    def _record(self, start: int, kind: int, object_id: str, content: bytes, *, whole: bool) -> None:
        if kind == COMMIT:
            parents = commit_parents(content, whole)
            if parents is None:
                self.known.unreadable.add(object_id)
            elif len(self.known.commits) < MAX_COMMITS:
                self.known.commits[object_id] = parents
        else:
            target = tag_target(content)
            if target is None:
                self.known.unreadable.add(object_id)
            elif len(self.known.tags) < MAX_COMMITS:
                self.known.tags[object_id] = target
        if whole and self._kept_bytes + len(content) <= MAX_KEPT_TOTAL:
            kept = _Kept(kind, content)
            self._kept_by_offset[start] = self._kept_by_id[object_id] = kept
            self._kept_bytes += len(content)


def _offset_varint(data: bytes, position: int) -> tuple[int, int] | None:
    """An OFS_DELTA's distance back to its base: big-endian base-128, each continuation adding one (pack-format)."""
    if position >= len(data):
        return None
    byte = data[position]
    value, position = byte & 0x7F, position + 1
    while byte & 0x80:
        if position >= len(data):
            return None
        if value > 1 << 56:
            raise MalformedPack("a delta base offset over 2^63")
        byte = data[position]
        value, position = ((value + 1) << 7) | (byte & 0x7F), position + 1
    return value, position


def commit_parents(content: bytes, whole: bool = True) -> tuple[str, ...] | None:
    """A commit's parents as git reads them (commit.c, parse_commit_buffer): a `tree` line first, then only the
    `parent` lines right after it; a `parent` line anywhere else is not a parent. None: git could not parse it,
    or the kept start of a huge commit ends before its parent lines do."""
    if not (content.startswith(b"tree ") and _HEX.fullmatch(content[5:45]) and content[45:46] == b"\n"):
        return None
    parents, position = [], 46
    while content.startswith(b"parent ", position):
        line = content[position + 7 : position + 47]
        if not (_HEX.fullmatch(line) and content[position + 47 : position + 48] == b"\n"):
            return None
        parents.append(line.decode("ascii").lower())
        position += 48
    if not whole and len(content) - position < 48:
        return None  # the kept start may have cut a parent line off
    return tuple(parents)


def tag_target(content: bytes) -> tuple[str, str] | None:
    """An annotated tag's object and its type, as git reads them (tag.c, parse_tag_buffer)."""
    if not (content.startswith(b"object ") and _HEX.fullmatch(content[7:47]) and content[47:53] == b"\ntype "):
        return None
    kind, newline, _ = content[53:].partition(b"\n")
    if not newline or kind not in (b"commit", b"tree", b"blob", b"tag"):
        return None
    return content[7:47].decode("ascii").lower(), kind.decode("ascii")
