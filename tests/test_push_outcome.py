"""Upstream's verdicts per ref, read off receive-pack's answer as it streams back to git."""

from __future__ import annotations

from proxy.push.outcome import UpstreamReport
from proxy.push.report import pkt_line

REFS = ["refs/heads/a", "refs/heads/b"]


def report(*lines: str) -> bytes:
    return b"".join(pkt_line(line.encode() + b"\n") for line in lines) + b"0000"


def on_bands(report_bytes: bytes) -> bytes:
    """As receive-pack sends it with side-band-64k: progress on band 2 around the report on band 1, then a flush."""
    progress = pkt_line(b"\x02Resolving deltas: 100% (3/3)\r")
    half = len(report_bytes) // 2
    return (
        progress
        + pkt_line(b"\x01" + report_bytes[:half])
        + progress
        + pkt_line(b"\x01" + report_bytes[half:])
        + b"0000"
    )


def read(data: bytes, capabilities: list[str], chunk: int) -> dict[str, str]:
    reader = UpstreamReport(REFS, capabilities)
    for start in range(0, len(data), chunk):
        reader.feed(data[start : start + chunk])
    return reader.results


def test_ok_and_ng_with_and_without_side_band_whatever_the_chunks() -> None:
    answer = report("unpack ok", "ok refs/heads/a", "ng refs/heads/b pre-receive hook declined", "ok refs/heads/zz")
    expected = {"refs/heads/a": "ok", "refs/heads/b": "ng:pre-receive hook declined"}
    for chunk in (1, 3, 1000):
        assert read(answer, ["report-status"], chunk) == expected
        assert read(on_bands(answer), ["report-status", "side-band-64k"], chunk) == expected


def test_report_status_v2_option_lines_and_hostile_answers_are_harmless() -> None:
    v2 = report("unpack ok", "ok refs/heads/a", "option refname refs/heads/a", "option forced-update")
    assert read(v2, ["report-status-v2"], 7) == {"refs/heads/a": "ok"}
    assert read(b"zzzz" + report("ok refs/heads/a"), ["report-status"], 7) == {}
    assert read(b"fff1" + b"x" * 70_000, ["report-status"], 4096) == {}
    escape = report("ng refs/heads/a \x1b[31mred\x07 " + "x" * 1000)
    assert read(escape, ["report-status"], 50)["refs/heads/a"] == "ng:" + (" [31mred  " + "x" * 1000)[:300]
