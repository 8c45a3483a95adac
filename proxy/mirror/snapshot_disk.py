"""The mirror's disk as snapshots use it: room for a snapshot being restored or a bundle being published, and what a
mirror's objects take (`git count-objects`)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from .gitrun import MirrorGit

DISK_MARGIN = 64 * (1 << 20)  # left free beside a restore or a bundle: the mirrors' own fetches need room too
# A pack's index (v2) takes 28 bytes per object (id, CRC, offset) plus its reverse index's 4: a pack of many small
# objects has an index larger than itself (400,000 tiny blobs: a 6 MiB pack, an 11 MiB index).
INDEX_BYTES_PER_OBJECT = 32


def restored_size(pack_size: int, pack_start: bytes) -> int | None:
    """What a restored pack takes on disk with its index, from the object count in its header (the 12 bytes that
    open every pack); None before those bytes are known."""
    if len(pack_start) < 12 or pack_start[:4] != b"PACK":
        return None
    return pack_size + INDEX_BYTES_PER_OBJECT * int.from_bytes(pack_start[8:12], "big")


async def ensure_room(directory: Path, needed: int, what: str) -> None:
    """OSError unless the disk holding `directory` has `needed` bytes free, and DISK_MARGIN more. `what`: for the
    message ("a 1234-byte snapshot")."""
    free = (await asyncio.to_thread(shutil.disk_usage, directory)).free
    if free < needed + DISK_MARGIN:
        raise OSError(f"{free} bytes free on the mirror's disk, too few for {what}")


async def object_counts(git: MirrorGit, mirror: Path) -> dict[str, str] | None:
    """`git count-objects -v` of a mirror ("count", "size", "in-pack", "size-pack" in KiB, ...); None if it failed."""
    done = await git.run(mirror, "count-objects", "-v")
    if done.returncode != 0:
        return None
    return dict(line.split(": ", 1) for line in done.stdout.decode().splitlines() if ": " in line)
