"""What every bench shares: progress on stderr, one percentile, timers, a log's tail, a scratch folder, the report."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HOST = "127.0.0.1"  # every socket a bench opens is on loopback
STARTUP_TIMEOUT = 30.0  # seconds for a server to start answering
STOP_TIMEOUT = 10.0  # seconds a server gets to exit after SIGTERM before SIGKILL
MIB = 1 << 20


def log(message: str) -> None:
    # Progress goes to stderr so that `--json` leaves stdout parseable.
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0.99 for p99) by linear interpolation between the two nearest ranks: numpy's
    default, and `statistics.quantiles(..., method="inclusive")`. So p50 is `statistics.median`, which the benches
    use for their medians, and every p50 and p99 in bench/ is this one, comparable across benches."""
    if not values:
        raise ValueError("a percentile of no values")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


class Stopwatch:
    """Started when made; reads the time since then on the finest clock there is (`time.perf_counter_ns`)."""

    def __init__(self) -> None:
        self._started = time.perf_counter_ns()

    @property
    def seconds(self) -> float:
        return (time.perf_counter_ns() - self._started) / 1e9

    @property
    def ms(self) -> float:
        return (time.perf_counter_ns() - self._started) / 1e6

    @property
    def us(self) -> float:
        return (time.perf_counter_ns() - self._started) / 1e3


async def timed_us(call: Callable[[], Awaitable[Any]]) -> float:
    """Microseconds one await of `call()` takes; what is built for it must be built before."""
    watch = Stopwatch()
    await call()
    return watch.us


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a server's log, for an error message; empty if there is no log (yet)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cpus() -> int:
    """The cores this process may run on (nproc), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def in_scratch(prefix: str, run: Callable[[Path], T]) -> T:
    """`run(folder)` in a fresh temporary folder, removed afterwards whatever happens. Every bench drives git, so
    git must be on PATH."""
    if shutil.which("git") is None:
        raise SystemExit("git is not on PATH")
    with tempfile.TemporaryDirectory(prefix=prefix) as temp:
        return run(Path(temp))


def print_report(results: Mapping[str, Any], as_json: bool, render: Callable[[Mapping[str, Any]], str]) -> None:
    """The report on stdout: JSON for a machine, or the bench's own Markdown."""
    print(json.dumps(results, indent=2) if as_json else render(results))
