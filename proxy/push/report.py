"""git's own answer to a refused push: a receive-pack report, so that git prints `[remote rejected] (<reason>)`."""

from __future__ import annotations

from collections.abc import Sequence

RESULT_TYPE = "application/x-git-receive-pack-result"
_SIDEBAND_64K = 65520 - 5  # a side-band-64k packet's payload after its length and band byte (sideband.c)
_SIDEBAND = 1000 - 5  # the old side-band's
_MAX_REASON = 512


def receive_pack_report(refusals: Sequence[tuple[str, str]], capabilities: Sequence[str]) -> bytes:
    """`unpack ok`, then `ng <ref> <reason>` for every command, then a flush (receive-pack's `report`). With
    `report-status-v2` the lines are the same: v2 only adds `option` lines after `ok` ones. With side-band(-64k),
    the report travels on band 1, followed by a flush of the band stream, as receive-pack sends it."""
    lines = [b"unpack ok\n"]
    lines += [f"ng {_clean(ref)} {_clean(reason)[:_MAX_REASON]}\n".encode() for ref, reason in refusals]
    report = b"".join(map(pkt_line, lines)) + b"0000"
    if "side-band-64k" in capabilities:
        return _on_band_one(report, _SIDEBAND_64K)
    if "side-band" in capabilities:
        return _on_band_one(report, _SIDEBAND)
    return report


def reads_a_report(capabilities: Sequence[str]) -> bool:
    """Whether the client asked for a report at all: without one it would not read the `ng` lines."""
    return "report-status" in capabilities or "report-status-v2" in capabilities


def pkt_line(payload: bytes) -> bytes:
    return b"%04x" % (len(payload) + 4) + payload


def _on_band_one(data: bytes, size: int) -> bytes:
    packets = [pkt_line(b"\x01" + data[start : start + size]) for start in range(0, len(data), size)]
    return b"".join(packets) + b"0000"


def _clean(text: str) -> str:
    """One line of printable text: a ref name or reason never breaks the report's framing or the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text)
