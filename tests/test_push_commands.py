"""The receive-pack command list, read off hand-built bodies: parsed exactly as receive-pack reads it, or refused."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from proxy.push.commands import (
    ZERO_ID,
    CommandLimits,
    CommandList,
    Kind,
    MalformedCommands,
    RefUpdate,
    read_command_list,
)

A, B, C = "a" * 40, "b" * 40, "c" * 40
CAPS = "report-status side-band-64k agent=git/2.47.0"


def pkt(payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return b"%04x" % (len(data) + 4) + data


def command_list(*lines: str, caps: str = CAPS, flush: bool = True) -> bytes:
    """`old new ref` lines as git sends them: capabilities after a NUL on the first, then a flush."""
    out = b"".join(pkt(f"{line}\0{caps}" if index == 0 else line) for index, line in enumerate(lines))
    return out + (b"0000" if flush else b"")


def body_stream(body: bytes, chunk: int = 7) -> aiohttp.StreamReader:
    """A request body as aiohttp hands it over, arriving in small pieces, then its end."""
    # A limit over the body: feeding past it would ask a transport (there is none) to pause.
    reader = aiohttp.StreamReader(BaseProtocol(asyncio.get_running_loop()), max(len(body), 1 << 16))
    for start in range(0, len(body), chunk):
        reader.feed_data(body[start : start + chunk])
    reader.feed_eof()
    return reader


async def read(body: bytes, limits: CommandLimits | None = None) -> tuple[CommandList | str, bytes]:
    """The parsed list (or the refusal's message), and what is left in the body after it."""
    stream = body_stream(body)
    try:
        parsed: CommandList | str = await read_command_list(stream, limits)
    except MalformedCommands as error:
        parsed = str(error)
    return parsed, await stream.read()


async def test_a_push_as_git_sends_it_is_read_up_to_its_flush_and_the_pack_stays_unread() -> None:
    commands = command_list(f"{A} {B} refs/heads/main", f"{ZERO_ID} {C} refs/heads/new", f"{A} {ZERO_ID} refs/tags/x")
    parsed, rest = await read(pkt(f"shallow {C}\n") + commands + b"PACK...")
    assert isinstance(parsed, CommandList)
    assert parsed.raw == pkt(f"shallow {C}\n") + commands
    assert rest == b"PACK..."
    assert parsed.updates == (
        RefUpdate(A, B, "refs/heads/main"),
        RefUpdate(ZERO_ID, C, "refs/heads/new"),
        RefUpdate(A, ZERO_ID, "refs/tags/x"),
    )
    assert [u.kind for u in parsed.updates] == [Kind.UPDATE, Kind.CREATE, Kind.DELETE]
    assert parsed.capabilities == tuple(CAPS.split())
    assert parsed.shallow == (C,)
    assert parsed.asks_for("side-band-64k") and parsed.asks_for("agent")


async def test_push_options_after_their_own_flush_are_read_too() -> None:
    options = pkt("ci.skip") + pkt("merge_request.create\n") + b"0000"
    commands = command_list(f"{A} {B} refs/heads/main", caps="report-status push-options")
    parsed, rest = await read(commands + options + b"PACK")
    assert isinstance(parsed, CommandList)
    assert parsed.push_options == ("ci.skip", "merge_request.create")
    assert parsed.raw == commands + options and rest == b"PACK"


async def test_lines_lose_one_newline_as_receive_pack_chomps_it() -> None:
    parsed, _ = await read(pkt(f"{A} {B} refs/heads/a\0{CAPS}\n") + pkt(f"{A} {B} refs/heads/b\n") + b"0000")
    assert isinstance(parsed, CommandList)
    assert [u.ref for u in parsed.updates] == ["refs/heads/a", "refs/heads/b"]
    parsed, _ = await read(pkt(f"{A} {B} refs/heads/b\n\n") + b"0000")
    assert isinstance(parsed, CommandList)
    assert [u.ref for u in parsed.updates] == ["refs/heads/b\n"]  # refused as a ref name


async def test_git_s_probe_a_lone_flush_is_an_empty_list_but_only_when_nothing_follows() -> None:
    parsed, _ = await read(b"0000")
    assert isinstance(parsed, CommandList) and parsed.updates == () and parsed.raw == b"0000"
    parsed, _ = await read(b"0000" + command_list(f"{A} {B} refs/heads/main"))
    assert parsed == "bytes after an empty command list"


FIRST = pkt(f"{A} {B} refs/heads/agent/x\0{CAPS}")


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (b"", "the body ended inside the command list (no flush)"),
        (FIRST, "the body ended inside the command list (no flush)"),  # no flush
        (FIRST + b"00", "the body ended inside the command list (no flush)"),
        (FIRST + b"0064" + b"short", "the body ended inside the command list (no flush)"),  # a length past the body
        (FIRST + b"0001" + b"0000", "a 0001 packet"),
        (FIRST + b"0002" + b"0000", "a 0002 packet"),
        (FIRST + b"0003" + b"0000", "a 0003 packet"),
        (FIRST + b"0004" + b"0000", "a 0004 packet"),
        (FIRST + b"fff1" + b"x" * 65517 + b"0000", "a pkt-line of 65521 bytes, over git's 65520"),
        (FIRST + b"zzzz", "not 4 lowercase hex digits"),
        (FIRST + b"00A0", "not 4 lowercase hex digits"),
        (FIRST + pkt(f"{A} {C} refs/heads/main\0report-status") + b"0000", "a NUL after the first command"),
        (pkt(f"{A} {B} refs/heads/x\0report-status\0side-band-64k") + b"0000", "a NUL inside the capabilities"),
        (FIRST + pkt(f"{A.upper()} {C} refs/heads/main") + b"0000", "not 40 lowercase hex digits"),
        (pkt(f"{'a' * 64} {'b' * 64} refs/heads/x\0object-format=sha256") + b"0000", "object format 'sha256'"),
        (pkt(f"{'a' * 64} {'b' * 64} refs/heads/x\0report-status") + b"0000", "a command that is not"),
        (pkt(f"{A} {B} refs/heads/x\0object-format=sha256") + b"0000", "object format 'sha256'"),
        (FIRST + pkt(f"{A}  refs/heads/main") + b"0000", "a command that is not `<old-id> <new-id> <ref>`"),
        (FIRST + pkt(f"shallow {C}") + b"0000", "a command that is not"),  # shallow lines come first
        (pkt(f"shallow {C[:39]}") + FIRST + b"0000", "a shallow line with an object id"),
        (FIRST + pkt(f"{A} {C} refs/heads/agent/x") + b"0000", "a ref named by two commands"),
        (pkt(b"push-cert\0report-status") + b"0000", "a signed push (push certificate)"),
        (FIRST + pkt(f"{A} {C} refs/heads/".encode() + b"\xff") + b"0000", "a ref name that is not UTF-8"),
        (command_list(f"{A} {B} refs/heads/x", caps="push-options") + pkt(b"a\0b") + b"0000", "a NUL in a push option"),
        (command_list(f"{A} {B} refs/heads/x", caps="push-options") + pkt("opt"), "the body ended inside"),
    ],
)
async def test_malformed_lists_are_refused(body: bytes, refusal: str) -> None:
    parsed, _ = await read(body)
    assert isinstance(parsed, str) and refusal in parsed, parsed


async def test_bounds_on_bytes_and_commands() -> None:
    many = command_list(*(f"{A} {B} refs/heads/b{i}" for i in range(4)))
    parsed, _ = await read(many, CommandLimits(max_commands=3))
    assert parsed == "more than 3 commands"
    parsed, _ = await read(many, CommandLimits(max_bytes=200))
    assert parsed == "a command list over 200 bytes"
    parsed, _ = await read(many, CommandLimits(max_bytes=len(many), max_commands=4))
    assert isinstance(parsed, CommandList)


async def test_a_second_command_after_an_allowed_one_is_read_not_hidden() -> None:
    parsed, _ = await read(command_list(f"{A} {B} refs/heads/agent/x", f"{A} {C} refs/heads/main"))
    assert isinstance(parsed, CommandList)
    assert [u.ref for u in parsed.updates] == ["refs/heads/agent/x", "refs/heads/main"]


async def test_a_broken_connection_is_a_refusal() -> None:
    reader = aiohttp.StreamReader(BaseProtocol(asyncio.get_running_loop()), 1 << 16)
    reader.feed_data(FIRST)
    reader.set_exception(aiohttp.ClientPayloadError("connection lost"))
    with pytest.raises(MalformedCommands, match="broke off"):
        await read_command_list(reader)
