"""The mirror's disk as snapshots use it: room for a snapshot being restored or a bundle being published, and what a
mirror's objects take (`git count-objects`)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from .gitrun import MirrorGit

DISK_MARGIN = 64 * (1 << 20)  # left free beside a restore or a bundle: the mirrors' own fetches need room too


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
