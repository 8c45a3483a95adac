"""Reads a client's upload-pack request (pkt-lines, v0 or v2): what it wants, and whether a mirror may answer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

FLUSH, DELIM, RESPONSE_END = "flush", "delim", "response-end"
_SPECIAL = {0: FLUSH, 1: DELIM, 2: RESPONSE_END}
_LENGTH = re.compile(rb"[0-9a-fA-F]{4}")
# fullmatch only, everywhere: `$` also matches before a final newline, and an id that carries one ("<id>\n") once
# reached `git rev-list --stdin`, where the empty line it made ended the list before the wants it had to check.
_OBJECT_ID = re.compile(r"[0-9a-f]{40}")  # SHA-1: a mirror is created with git's default object format
# A ref name as git allows it on the wire; anything else in a want-ref is not a request a mirror should guess at.
_REF_NAME = re.compile(r"refs/[A-Za-z0-9._/+-]{1,1000}")
# A real request lists wants and the client's haves: thousands of lines at most. Past this, a body built to make
# the parser spin (millions of flushes compress into a few KiB) is passed upstream unread.
MAX_LINES = 50_000


class NotAPackRequest(ValueError):
    """A body the mirror does not answer: malformed, another v2 command, or something it cannot serve."""


@dataclass
class PackRequest:
    """What a mirror needs to know of a pack request; the body itself goes to upload-pack unchanged."""

    version: Literal[0, 2]
    wants: list[str] = field(default_factory=list)  # object ids
    want_refs: list[str] = field(default_factory=list)  # v2 `want-ref`: refs the server resolves
    shallow: list[str] = field(default_factory=list)  # the client's shallow boundary commits
    deepen: str | None = None  # `deepen N`, `deepen-since T`, `deepen-not R`: served by upload-pack as is
    filter: str | None = None
    done: bool = False


def pkt_lines(body: bytes) -> Iterator[str | bytes]:
    """Payloads as bytes (one trailing LF removed), or FLUSH/DELIM/RESPONSE_END; raises on broken framing."""
    position, count = 0, 0
    while position < len(body):
        count += 1
        if count > MAX_LINES:
            raise NotAPackRequest(f"more than {MAX_LINES} pkt-lines")
        header = body[position : position + 4]
        if not _LENGTH.fullmatch(header):
            raise NotAPackRequest(f"bad pkt-line length {header!r} at byte {position}")
        length = int(header, 16)
        if length < 4:
            if length not in _SPECIAL:
                raise NotAPackRequest(f"bad pkt-line length {header!r} at byte {position}")
            yield _SPECIAL[length]
            position += 4
            continue
        if position + length > len(body):
            raise NotAPackRequest("truncated pkt-line")
        yield body[position + 4 : position + length].removesuffix(b"\n")
        position += length


def is_pack_request(body: bytes) -> bool:
    """Whether `body` asks for a pack (v2 `fetch`, or v0): false for ls-refs and whatever cannot be read."""
    try:
        parse_pack_request(body)
    except NotAPackRequest:
        return False
    return True


def parse_pack_request(body: bytes) -> PackRequest:
    """A v2 `command=fetch` or a v0 negotiation request; anything else raises NotAPackRequest."""
    lines = list(pkt_lines(body))
    first = lines[0] if lines else None
    if isinstance(first, bytes) and first.startswith(b"command="):
        return _parse_v2(lines)
    return _parse_v0(lines)


def _parse_v2(lines: list[str | bytes]) -> PackRequest:
    command = _text(lines[0]).removeprefix("command=")
    if command != "fetch":
        raise NotAPackRequest(f"v2 command {command!r} is not a pack request")
    if DELIM not in lines:
        raise NotAPackRequest("v2 fetch without arguments")
    capabilities = lines[1 : lines.index(DELIM)]
    for capability in capabilities:
        name, _, value = _text(capability).partition("=")
        if name == "object-format" and value != "sha1":
            raise NotAPackRequest(f"object format {value!r}")
    request = PackRequest(version=2)
    arguments = lines[lines.index(DELIM) + 1 :]
    if arguments[-1:] != [FLUSH]:
        raise NotAPackRequest("v2 fetch not ended by a flush")
    for line in arguments[:-1]:
        _read_argument(request, _text(line))
    if not request.wants and not request.want_refs:
        raise NotAPackRequest("v2 fetch without wants")
    return request


def _parse_v0(lines: list[str | bytes]) -> PackRequest:
    """`want <id> <caps>`, more wants, shallow/deepen/filter, flush, then haves and maybe `done`."""
    request = PackRequest(version=0)
    for index, line in enumerate(lines):
        if not isinstance(line, bytes):
            if line != FLUSH:
                raise NotAPackRequest(f"{line} packet in a v0 request")
            continue
        text = _text(line)
        if index == 0:
            if not text.startswith("want "):
                raise NotAPackRequest("a v0 request starts with a want")
            text = " ".join(text.split(" ")[:2])  # capabilities follow the first want; upload-pack reads them
        _read_argument(request, text)
    if not request.wants:
        raise NotAPackRequest("v0 request without wants")
    return request


def _read_argument(request: PackRequest, line: str) -> None:
    name, _, value = line.partition(" ")
    if name == "want":
        request.wants.append(_object_id(value))
    elif name == "want-ref":
        if not _REF_NAME.fullmatch(value) or ".." in value:
            raise NotAPackRequest("unusual want-ref")
        request.want_refs.append(value)
    elif name == "shallow":
        request.shallow.append(_object_id(value))
    elif name in ("deepen", "deepen-since", "deepen-not"):
        request.deepen = line
    elif name == "filter":
        request.filter = value
    elif name == "done":
        request.done = True
    # Everything else (have, thin-pack, ofs-delta, no-progress, include-tag, sideband-all, wait-for-done,
    # packfile-uris, deepen-relative, server-option) is upload-pack's business; it refuses what it does not know.


def _object_id(value: str) -> str:
    if not _OBJECT_ID.fullmatch(value):
        raise NotAPackRequest("an object id that is not SHA-1 hex")
    return value


def _text(line: str | bytes) -> str:
    if not isinstance(line, bytes):
        raise NotAPackRequest(f"unexpected {line} packet")
    try:
        return line.decode("ascii")
    except UnicodeDecodeError:
        raise NotAPackRequest("a request line that is not ASCII") from None
