"""Upstream's own verdict on each ref of a push that went on, read from its report as it streams back (audit)."""

from __future__ import annotations

from collections.abc import Sequence

_MAX_PACKET = 65520
_MAX_REASON = 300


class UpstreamReport:
    """Sans-IO: `feed` it receive-pack's answer as it is passed back to git, unchanged. It reads the report
    (`ok <ref>` / `ng <ref> <reason>` lines), on band 1 when side-band was asked for, and keeps one result per ref
    that was pushed: `ok`, or `ng:<reason>`. Anything it cannot read stops it quietly: the audit then says
    nothing more than "sent", and the bytes to git are never touched."""

    def __init__(self, refs: Sequence[str], capabilities: Sequence[str]) -> None:
        self.results: dict[str, str] = {}
        self._refs = frozenset(refs)
        self._sideband = "side-band-64k" in capabilities or "side-band" in capabilities
        self._outer = bytearray()  # side-band packets not yet whole
        self._inner = bytearray()  # report pkt-lines not yet whole
        self._stopped = not refs

    def feed(self, chunk: bytes) -> None:
        if self._stopped:
            return
        if not self._sideband:
            self._take_report(chunk)
            return
        self._outer += chunk
        for payload in self._packets(self._outer):
            if payload[:1] == b"\x01":
                self._take_report(payload[1:])
            # band 2 is progress, band 3 a fatal error: neither is a ref's result

    def _take_report(self, data: bytes) -> None:
        self._inner += data
        for line in self._packets(self._inner):
            self._take_line(line.removesuffix(b"\n").decode("utf-8", "replace"))

    def _packets(self, buffer: bytearray) -> list[bytes]:
        """Whole pkt-line payloads at the start of `buffer`, removed from it; stops the reader on bad framing."""
        out: list[bytes] = []
        while len(buffer) >= 4 and not self._stopped:
            try:
                length = int(buffer[:4], 16)
            except ValueError:
                length = -1
            if length == 0:
                del buffer[:4]
                continue
            if not 4 < length <= _MAX_PACKET:
                self._stopped = True
                break
            if len(buffer) < length:
                break
            out.append(bytes(buffer[4:length]))
            del buffer[:length]
        if len(buffer) > _MAX_PACKET:
            self._stopped = True
        return out

    def _take_line(self, line: str) -> None:
        verdict, _, rest = line.partition(" ")
        ref, _, reason = rest.partition(" ")
        if verdict in ("ok", "ng") and ref in self._refs and ref not in self.results:
            clean = "".join(char if char.isprintable() else " " for char in reason)[:_MAX_REASON]
            self.results[ref] = "ok" if verdict == "ok" else f"ng:{clean}"
