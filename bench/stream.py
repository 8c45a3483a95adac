"""Streaming CPU: one large answer from a bare upstream, passed on by nginx and by the proxy; CPU s/GiB of each.

A clone's CPU figure moves with how git, the fake and the proxy happen to share two cores (one proxy's median clone
went from 1.6 to 2.9 s/GiB between runs with nothing changed). Here the upstream is a script that sends from memory
and the client a loop that only counts, and the process measured has a core to itself when the machine has two:
what is left is the cost of passing bytes on. Two upstreams: one as fast as the socket takes it (256 KiB writes),
one paced like a pack over a link (16 KiB writes at 150 MiB/s), where the cost per read, not per byte, dominates.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench import clone
from bench.clone import Server, cpu_seconds
from bench.common import HOST, STARTUP_TIMEOUT, Stopwatch, log

UPSTREAM_SCRIPT = Path(__file__).resolve().with_name("_stream_upstream.py")
TARGET = "/github.com/acme/big.git/git-upload-pack"
MODES = {  # label: arguments of the upstream script
    "fast": ["--write-kib", "256"],
    "paced": ["--write-kib", "16", "--paced", "150"],
}
MODE_LABELS = {"fast": "as fast as it goes, 256 KiB writes", "paced": "paced, 16 KiB writes at 150 MiB/s"}
RECEIVE = 1 << 20
TIMEOUT = 120.0  # seconds for one answer


@dataclass
class StreamResult:
    cpu_s_per_gib: dict[str, list[float]]
    seconds: dict[str, list[float]]


@contextlib.contextmanager
def bare_upstream(workdir: Path, size_mib: int, mode: str) -> Iterator[Server]:
    command = [sys.executable, str(UPSTREAM_SCRIPT), "--host", HOST, "--size-mib", str(size_mib), *MODES[mode]]
    log_file = workdir / f"stream-upstream-{mode}.log"
    with clone.running(command, log_file, stdout=subprocess.PIPE) as process:
        yield Server("bare upstream", process, clone.read_first_line(process, STARTUP_TIMEOUT), log_file)


def fetch(url: str) -> int:
    """POSTs an upload-pack request and reads the chunked answer to its end; the bytes received."""
    host, _, port = url.removeprefix("http://").partition(":")
    body = b"0000"
    request = (
        f"POST {TARGET} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/x-git-upload-pack-request\r\n"
        f"Git-Protocol: version=2\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    received, tail, buffer = 0, b"", bytearray(RECEIVE)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as connection:
        connection.sendall(request)
        while not tail.endswith(b"\r\n0\r\n\r\n"):
            count = connection.recv_into(buffer)
            if not count:
                raise RuntimeError(f"{url} closed the connection after {received} bytes")
            received += count
            tail = (tail + bytes(buffer[max(0, count - 7) : count]))[-7:]
    return received


@contextlib.contextmanager
def pinned(servers: Mapping[str, Server], upstream: Server) -> Iterator[None]:
    """With two cores or more: the measured servers on one core, the upstream and this client on another."""
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        yield
        return
    mine = os.sched_getaffinity(0)
    first, second, *_ = sorted(mine)
    try:
        for pid in (0, upstream.pid):
            os.sched_setaffinity(pid, {first})
        for server in servers.values():
            os.sched_setaffinity(server.pid, {second})
        yield
    finally:
        os.sched_setaffinity(0, mine)


def stream_rounds(
    workdir: Path, nginx: str | None, size_mib: int, rounds: int, variants: Mapping[str, Mapping[str, str]]
) -> dict[str, StreamResult]:
    """For each upstream mode: one warm-up round, then `rounds` rounds, the paths taking turns."""
    results = {}
    for mode in MODES:
        with contextlib.ExitStack() as stack:
            upstream = stack.enter_context(bare_upstream(workdir, size_mib, mode))
            servers = {
                "proxy": stack.enter_context(clone.token_proxy_server(upstream.url, workdir, None, f"stream-{mode}"))
            }
            if nginx:
                servers["nginx"] = stack.enter_context(
                    clone.nginx_server(nginx, upstream.url, workdir, None, f"nginx-stream-{mode}")
                )
            for label, extra in variants.items():
                servers[label] = stack.enter_context(
                    clone.token_proxy_server(upstream.url, workdir, None, f"{label}-stream-{mode}", extra)
                )
            stack.enter_context(pinned(servers, upstream))
            urls = {"direct": upstream.url} | {path: server.url for path, server in servers.items()}
            result = results[mode] = StreamResult({path: [] for path in servers}, {path: [] for path in urls})
            for number in range(-1, rounds):
                for path, url in urls.items():
                    pid = servers[path].pid if path in servers else None
                    before, watch = (cpu_seconds(pid) if pid else None), Stopwatch()
                    gib = fetch(url) / (1 << 30)
                    elapsed = watch.seconds
                    if number < 0:
                        continue
                    result.seconds[path].append(elapsed)
                    if pid is not None and before is not None:
                        result.cpu_s_per_gib[path].append(((cpu_seconds(pid) or 0.0) - before) / gib)
            medians = ", ".join(f"{path} {statistics.median(v):.2f}" for path, v in result.cpu_s_per_gib.items())
            log(f"  stream {mode}: CPU s/GiB medians {medians}")
    return results
