"""A bare upstream for bench/stream.py: answers every request with one chunked body of random bytes, from memory.

Run as a script (its own process, so its CPU is not the proxy's): prints its URL, then serves until killed.
--paced MIB_S writes one --write-kib piece at a time at that rate, like a pack coming over a link; without it, the
body goes out as fast as the socket takes it. Costs the machine little more than the kernel's copies, so the CPU
that the proxy or nginx spend passing the body on is what the benchmark sees.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from typing import BinaryIO

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-result\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--write-kib", type=int, default=256)
    parser.add_argument("--paced", type=float, default=0.0, help="MiB/s; 0: as fast as the socket takes it")
    return parser.parse_args()


def read_request(stream: BinaryIO) -> bool:
    """Skips one request (its headers and its Content-Length body); False when the client has gone."""
    if not stream.readline():
        return False
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    stream.read(length)
    return True


def serve(connection: socket.socket, piece: bytes, pieces: int, rate: float) -> None:
    framed = memoryview(b"%x\r\n" % len(piece) + piece + b"\r\n")
    reader = connection.makefile("rb")
    with connection, reader:
        while read_request(reader):
            connection.sendall(HEAD)
            started, seconds_per_piece = time.monotonic(), (len(piece) / (rate * (1 << 20)) if rate else 0.0)
            for number in range(1, pieces + 1):
                connection.sendall(framed)
                if rate and (ahead := started + number * seconds_per_piece - time.monotonic()) > 0:
                    time.sleep(ahead)
            connection.sendall(b"0\r\n\r\n")


def main() -> None:
    args = parse_args()
    piece = os.urandom(args.write_kib * 1024)
    pieces = args.size_mib * 1024 // args.write_kib
    listener = socket.create_server((args.host, 0))
    print(f"http://{args.host}:{listener.getsockname()[1]}", flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve, args=(connection, piece, pieces, args.paced), daemon=True).start()


if __name__ == "__main__":
    main()
