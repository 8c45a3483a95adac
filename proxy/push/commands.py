"""Reads a receive-pack request's command list off the wire, exactly as receive-pack will, or refuses it."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from enum import Enum

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

ZERO_ID = "0" * 40
LARGE_PACKET_MAX = 65520  # git's largest pkt-line, its 4-byte length included (pkt-line.h)
MAX_COMMAND_BYTES = 1 << 20
MAX_COMMANDS = 10_000
_OBJECT_ID = re.compile(rb"[0-9a-f]{40}")  # SHA-1, lowercase as git sends it; GitHub has no SHA-256 repositories
_LENGTH = re.compile(rb"[0-9a-f]{4}")


class MalformedCommands(ValueError):
    """A command list that receive-pack might read otherwise than this reader, or that a bound refuses."""


class Kind(Enum):
    CREATE = "create"
    DELETE = "delete"
    UPDATE = "update"


@dataclass(frozen=True)
class RefUpdate:
    """One command: `<old> <new> <ref>`. `old` is checked by upstream's ref transaction, not trusted here."""

    old: str
    new: str
    ref: str

    @property
    def kind(self) -> Kind:
        if self.new == ZERO_ID:  # before CREATE: zeros to zeros deletes (a ref that is not there)
            return Kind.DELETE
        return Kind.CREATE if self.old == ZERO_ID else Kind.UPDATE


@dataclass(frozen=True)
class CommandList:
    """What receive-pack reads before the pack. `raw` is every byte consumed, to be sent on first, unchanged."""

    updates: tuple[RefUpdate, ...]
    capabilities: tuple[str, ...]  # as sent: `report-status`, `agent=git/2.47.0`, ...
    shallow: tuple[str, ...]
    push_options: tuple[str, ...]
    raw: bytes

    def asks_for(self, capability: str) -> bool:
        return any(item == capability or item.startswith(capability + "=") for item in self.capabilities)


@dataclass(frozen=True)
class CommandLimits:
    max_bytes: int = MAX_COMMAND_BYTES  # the command list and push options together
    max_commands: int = MAX_COMMANDS


class _Packet(Enum):
    FLUSH = "flush"


class _Reader:
    """pkt-lines from the body, each fully read or a refusal; counts what it consumed against the bound."""

    def __init__(self, content: aiohttp.StreamReader, limits: CommandLimits) -> None:
        self._content = content
        self.limits = limits
        self.raw = bytearray()

    async def packet(self) -> bytes | _Packet:
        header = await self._read(4)
        if not _LENGTH.fullmatch(header):
            # git writes lowercase hex; anything else (uppercase included, which git's reader accepts) is refused
            # rather than interpreted.
            raise MalformedCommands(f"a pkt-line length {header!r} that is not 4 lowercase hex digits")
        length = int(header, 16)
        if length == 0:
            return _Packet.FLUSH
        if length < 5:
            # 0001 (delim) and 0002 (response end) are v2 packets: receive-pack would end the list on them; 0003 is
            # no length at all, and 0004 an empty line, which receive-pack dies on.
            raise MalformedCommands(f"a {header.decode()} packet in a receive-pack command list")
        if length > LARGE_PACKET_MAX:
            raise MalformedCommands(f"a pkt-line of {length} bytes, over git's {LARGE_PACKET_MAX}")
        payload = await self._read(length - 4)
        return payload[:-1] if payload.endswith(b"\n") else payload  # receive-pack chomps one newline

    async def _read(self, size: int) -> bytes:
        if len(self.raw) + size > self.limits.max_bytes:
            raise MalformedCommands(f"a command list over {self.limits.max_bytes} bytes")
        try:
            data = await self._content.readexactly(size)
        except asyncio.IncompleteReadError:
            raise MalformedCommands("the body ended inside the command list (no flush)") from None
        except (OSError, aiohttp.ClientError, HttpProcessingError):
            raise MalformedCommands("the body broke off inside the command list") from None
        self.raw += data
        return data

    async def at_end(self) -> bool:
        """Whether the body ends here. Asked only after an empty command list, which git sends alone, as the
        probe before a large push (remote-curl's probe_rpc): 4 bytes, so nothing waits long."""
        try:
            return not await self._content.read(1)
        except (OSError, aiohttp.ClientError, HttpProcessingError):
            return False


async def read_command_list(content: aiohttp.StreamReader, limits: CommandLimits | None = None) -> CommandList:
    """The commands up to their flush, with the first command's capabilities, the `shallow` lines before them,
    and the push options (after their own flush) when `push-options` was asked for. Stricter than receive-pack
    wherever it is lenient, so that what is checked here is what receive-pack executes:
    - capabilities only after the first command's NUL (receive-pack reads them from any line with a NUL);
    - `shallow` lines only before the commands, each exactly `shallow <id>`;
    - no push certificate (`push-cert`: commands inside a signed blob), no other object format than SHA-1;
    - no ref named twice.
    An empty list is passed on only when nothing follows it (git's probe); receive-pack would ignore the rest."""
    reader = _Reader(content, limits or CommandLimits())
    updates: list[RefUpdate] = []
    shallow: list[str] = []
    capabilities: tuple[str, ...] = ()
    while (line := await reader.packet()) is not _Packet.FLUSH:
        assert isinstance(line, bytes)
        if line.startswith(b"shallow ") and not updates:
            shallow.append(_object_id(line[8:], "a shallow line"))
            continue
        command, nul, features = line.partition(b"\0")
        if nul:
            if updates:
                raise MalformedCommands("a NUL after the first command (capabilities come once, on the first)")
            capabilities = _capabilities(features)
        updates.append(_command(command))
        if len(updates) > reader.limits.max_commands:
            raise MalformedCommands(f"more than {reader.limits.max_commands} commands")
    _refuse_repeated_refs(updates)
    options: list[str] = []
    if updates and any(item == "push-options" for item in capabilities):
        while (line := await reader.packet()) is not _Packet.FLUSH:
            assert isinstance(line, bytes)
            options.append(_push_option(line))
    if not updates and not await reader.at_end():
        raise MalformedCommands("bytes after an empty command list")
    return CommandList(tuple(updates), capabilities, tuple(shallow), tuple(options), bytes(reader.raw))


def _command(line: bytes) -> RefUpdate:
    if line.startswith(b"push-cert"):
        raise MalformedCommands("a signed push (push certificate), which the push policy cannot read")
    old, new, ref = line[:40], line[41:81], line[82:]
    if len(line) < 83 or line[40:41] != b" " or line[81:82] != b" ":
        raise MalformedCommands("a command that is not `<old-id> <new-id> <ref>`")
    return RefUpdate(_object_id(old, "a command"), _object_id(new, "a command"), _text(ref, "a ref name"))


def _object_id(data: bytes, where: str) -> str:
    if not _OBJECT_ID.fullmatch(data):
        raise MalformedCommands(f"{where} with an object id that is not 40 lowercase hex digits (SHA-1)")
    return data.decode("ascii")


def _capabilities(features: bytes) -> tuple[str, ...]:
    if b"\0" in features:
        raise MalformedCommands("a NUL inside the capabilities (receive-pack would read only those before it)")
    items = tuple(item for item in _text(features, "the capabilities").split(" ") if item)  # as git splits them
    for item in items:
        name, _, value = item.partition("=")
        if name == "object-format" and value != "sha1":
            raise MalformedCommands(f"object format {value!r}: the push policy reads SHA-1 repositories only")
    return items


def _push_option(line: bytes) -> str:
    if b"\0" in line:
        raise MalformedCommands("a NUL in a push option")
    return _text(line, "a push option")


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCommands(f"{where} that is not UTF-8") from None


def _refuse_repeated_refs(updates: list[RefUpdate]) -> None:
    if len({update.ref for update in updates}) != len(updates):
        raise MalformedCommands("a ref named by two commands (git never sends that)")
