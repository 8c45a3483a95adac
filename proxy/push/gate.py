"""The one question `forward` asks of a push: may it go on (and with which bytes), or what does git read instead?"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from ..bodies import HeldBytes
from .ancestry import MAX_COMPARE_CALLS, MAX_WALK, MAX_WALK_TOTAL, AncestryChecker, CompareFn, Outcome, Verdict
from .commands import CommandLimits, CommandList, MalformedCommands, RefUpdate, read_command_list
from .decide import Reason, Refusal, Settled, check_refs, force_refusal, settle, undecidable_refusal
from .pack import MalformedPack, PackScanner, PackTooCostly
from .report import RESULT_TYPE, reads_a_report, receive_pack_report
from .rules import BoundPolicy

_SPOOL = 1 << 20  # a pack prefix held for a check stays in memory up to this size, then goes to a temporary file
_READ_BACK = 256 << 10
_STEP = 64 << 10
# Packs are read off the loop, in threads of their own: the default executor also resolves host names, which a
# few costly pushes must not hold up.
_SCANNERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="push-scan")


@dataclass(frozen=True)
class PushLimits:
    commands: CommandLimits = field(default_factory=CommandLimits)
    max_compare_calls: int = MAX_COMPARE_CALLS
    max_walk: int = MAX_WALK
    max_walk_total: int = MAX_WALK_TOTAL
    temp_dir: Path | None = None  # where a held pack prefix spills to (None: the system's temporary folder)
    shared: HeldBytes | None = None  # what every push being checked holds at once, on disk and in memory


@dataclass(frozen=True)
class RefResult:
    """One ref update for the audit line: `ok` (on its way upstream), or `refused:<reason>`."""

    ref: str
    old: str
    new: str
    result: str

    def as_audit(self) -> dict[str, str]:
        return {"ref": self.ref, "old": self.old, "new": self.new, "result": self.result}


@dataclass(frozen=True)
class Refused:
    """What git reads instead of upstream's answer. Nothing was sent upstream, and no token is needed."""

    status: int
    headers: dict[str, str]
    body: bytes
    reason: Reason  # the first refusal's: the metric's label
    message: str  # one line, for the log
    refs: tuple[RefResult, ...] = ()


@dataclass
class PassOn:
    """The push may go on: `prefix()` yields exactly the bytes read for the check (the command list, then what
    was held of the pack), after which the rest of the body follows from the request as it comes. `release()`
    (idempotent) drops what was held on disk; `prefix()` does it as well once it has been sent."""

    refs: tuple[RefResult, ...]
    commands: CommandList | None
    read: int  # bytes read off the body for the check (`progress` heard of each)
    _head: bytes = field(repr=False, default=b"")
    _held: _HeldPack | None = field(repr=False, default=None)

    async def prefix(self) -> AsyncIterator[bytes]:
        try:
            if self._head:
                yield self._head
            if self._held is not None:
                for chunk in self._held.chunks():
                    yield chunk
        finally:
            self.release()

    def release(self) -> None:
        self._head = b""
        if self._held is not None:
            self._held.close()
            self._held = None


async def check_push(
    content: aiohttp.StreamReader, content_encoding: str | None, policies: Sequence[BoundPolicy], who: str,
    compare: CompareFn | None, limits: PushLimits | None = None, progress: Callable[[int], None] | None = None,
) -> Refused | PassOn:  # fmt: skip
    """Reads a receive-pack request's command list (and, when a fast-forward must be proven, the pack until it
    is), and decides it against every policy: any refusal refuses the whole push. `who` names the pusher in
    messages. `compare` asks upstream about ancestry; it is called only for updates a policy keeps to
    fast-forwards, after every ref rule passed. `progress` hears of each chunk read here."""
    limits = limits or PushLimits()
    if not policies:
        return PassOn((), None, 0)
    if (content_encoding or "identity").strip().lower() != "identity":
        return _malformed(f"a compressed receive-pack body (Content-Encoding: {content_encoding})", who)
    try:
        commands = await read_command_list(content, limits.commands)
    except MalformedCommands as error:
        return _malformed(str(error), who)
    if progress is not None:
        progress(len(commands.raw))
    checks = check_refs(commands.updates, policies, who)
    refusals = {check.update.ref: check.refusal for check in checks if check.refusal is not None}
    pending = [check.update for check in checks if check.needs_ancestry]
    if refusals or not pending:
        return _outcome(commands, refusals, None)
    if compare is None:
        why = "the proxy has no GitHub API to ask for this repo"
        return _outcome(commands, {update.ref: undecidable_refusal(update, why) for update in pending}, None)
    checker = AncestryChecker(compare, limits.max_compare_calls, limits.max_walk, limits.max_walk_total)
    room = min(policy.max_checked_pack_size for policy in policies if not policy.force)
    held = _HeldPack(room, limits.temp_dir, limits.shared)
    try:
        refusals = await _prove_fast_forwards(content, pending, checker, held, who, progress)
    except BaseException:  # cancelled (the client left), or a bug: what was held goes all the same
        held.close()
        raise
    outcome = _outcome(commands, refusals, held)
    if isinstance(outcome, Refused):
        held.close()
    return outcome


async def _prove_fast_forwards(
    content: aiohttp.StreamReader, pending: list[RefUpdate], checker: AncestryChecker, held: _HeldPack, who: str,
    progress: Callable[[int], None] | None,
) -> dict[str, Refusal]:  # fmt: skip
    """Reads the pack, holding it, until every pending update is decided: first once the commits are in (git
    writes them before any tree or blob), then, if a commit was still missing, at the end of the pack. The
    bytes held are the ones read; the rest of the body stays in the socket until it is passed on."""
    scanner, tried_early = PackScanner(), False
    try:
        while not scanner.done:
            chunk = await content.read(_STEP)  # not readany(): that takes whatever is buffered, however much
            if not chunk:
                scanner.finish()
            if progress is not None:
                progress(len(chunk))
            if not held.write(chunk):
                return {update.ref: undecidable_refusal(update, held.why_full()) for update in pending}
            # Off the loop: a chunk can take a while to read (a delta of a million tiny copies, a zlib bomb),
            # within the scanner's budgets; other requests go on meanwhile.
            await asyncio.get_running_loop().run_in_executor(_SCANNERS, scanner.feed, chunk)
            if scanner.past_commits and not tried_early:
                tried_early = True
                decided = await _decide(pending, checker, scanner, who, final=False)
                if decided is not None:
                    return decided
    except MalformedPack as error:
        return {update.ref: Refusal(Reason.MALFORMED, f"a malformed pack: {error}") for update in pending}
    except PackTooCostly as error:
        why = f"the push is too costly to read: {error}"
        return {update.ref: undecidable_refusal(update, why) for update in pending}
    except (OSError, aiohttp.ClientError, HttpProcessingError):
        return {update.ref: Refusal(Reason.MALFORMED, "the push broke off in its pack") for update in pending}
    decided = await _decide(pending, checker, scanner, who, final=True)
    assert decided is not None
    return decided


async def _decide(
    pending: list[RefUpdate], checker: AncestryChecker, scanner: PackScanner, who: str, *, final: bool
) -> dict[str, Refusal] | None:
    """Refusals (empty: all fast-forwards) once decided; None while an update is still OPEN. The first
    refusal ends it: the push is refused whatever the others are."""
    verdicts: list[tuple[RefUpdate, Verdict]] = []
    for update in pending:
        verdict = await checker.check(update.old, update.new, scanner.known, final=final)
        if verdict.outcome is Outcome.FORCE:
            return {update.ref: force_refusal(update, who)}
        if verdict.outcome is Outcome.UNDECIDABLE:
            return {update.ref: undecidable_refusal(update, verdict.why)}
        verdicts.append((update, verdict))
    if any(verdict.outcome is Outcome.OPEN for _, verdict in verdicts):
        return None
    return {}


async def discard_rest(content: aiohttp.StreamReader, limit: int) -> bool:
    """Reads what is left of a refused push and drops it, up to `limit` bytes; True once the body has ended.
    git (curl) reads the answer only after sending its whole body: an answer given while it still sends is lost
    when the connection closes under it (`RPC failed; curl 55 Send failure: Broken pipe`, then a misleading
    "Everything up-to-date"). Draining first lets git print `[remote rejected] (<reason>)`. Nothing is held."""
    drained = 0
    try:
        while chunk := await content.read(_STEP):
            drained += len(chunk)
            if drained > limit:
                return False
    except (OSError, aiohttp.ClientError, HttpProcessingError):
        return False
    return True


def _outcome(commands: CommandList, refusals: dict[str, Refusal], held: _HeldPack | None) -> Refused | PassOn:
    settled = settle(commands.updates, refusals)
    if settled.refused is None:
        refs = tuple(RefResult(u.ref, u.old, u.new, "ok") for u in commands.updates)
        read = len(commands.raw) + (held.size if held is not None else 0)
        return PassOn(refs, commands, read, commands.raw, held)
    return _report(commands, settled)


def _report(commands: CommandList, settled: Settled) -> Refused:
    assert settled.refused is not None
    refs = tuple(
        RefResult(update.ref, update.old, update.new, f"refused:{'atomic' if r.atomic else r.reason.value}")
        for update, r in settled.results
        if r is not None
    )
    message = f"push refused: {settled.refused.message}"
    if not reads_a_report(commands.capabilities):
        return Refused(403, _TEXT, f"{message}\n".encode(), settled.refused.reason, message, refs)
    lines = [(update.ref, refusal.message) for update, refusal in settled.results if refusal is not None]
    body = receive_pack_report(lines, commands.capabilities)
    headers = {"Content-Type": RESULT_TYPE, "Cache-Control": "no-cache"}
    return Refused(200, headers, body, settled.refused.reason, message, refs)


_TEXT = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache"}


def _malformed(why: str, who: str) -> Refused:
    """A request whose commands cannot be read: there is no ref to answer for, so a plain refusal."""
    message = f"push refused for '{who}': a malformed receive-pack request: {why}"
    return Refused(400, _TEXT, f"{message}\n".encode(), Reason.MALFORMED, message)


class _HeldPack:
    """The pack bytes read while checking, to be sent on first: in memory up to _SPOOL, then in an unnamed
    temporary file (gone with its descriptor, whatever path the request takes), never more than `limit`, and
    taken from `shared` (what all checks together may hold) as it grows."""

    def __init__(self, limit: int, directory: Path | None, shared: HeldBytes | None = None) -> None:
        self.limit = limit
        self.size = 0
        self._shared = shared
        self._shared_full = False
        self._file: IO[bytes] | None = tempfile.SpooledTemporaryFile(_SPOOL, dir=str(directory) if directory else None)  # noqa: SIM115

    def write(self, chunk: bytes) -> bool:
        if self.size + len(chunk) > self.limit or self._file is None:
            return False
        if self._shared is not None and not self._shared.take(len(chunk)):
            self._shared_full = True
            return False
        self._file.write(chunk)
        self.size += len(chunk)
        return True

    def why_full(self) -> str:
        if self._shared_full and self._shared is not None:
            return (
                f"the proxy already holds {self._shared.limit >> 20} MiB of pushes being checked; push again "
                "in a moment"
            )
        return f"the push is over push.maxCheckedPackSize ({self.limit} bytes) before its commits are in"

    def chunks(self) -> Iterator[bytes]:
        if self._file is None:
            return
        self._file.seek(0)
        while chunk := self._file.read(_READ_BACK):
            yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._shared is not None:
                self._shared.give_back(self.size)
