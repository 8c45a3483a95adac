"""Files the proxy reads (config, secret files, keys, CA bundles): regular files only, bounded, never blocking.

A path in a config can name a FIFO, `/dev/zero` or a 200 MiB file as easily as a PEM. Reading one of those would
block the event loop or exhaust memory, so every file is checked before it is opened and read with a cap.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Anything else is an OSError whose `strerror` says
    why (`not a regular file (a FIFO)`, `larger than 1 MiB`), raised at once: nothing here blocks or reads without
    end."""
    _require_regular(path, path.stat(), limit)  # before opening: opening a device can block or have side effects
    # O_NONBLOCK: a FIFO swapped in between the stat and the open must not block the open (it has no effect on a
    # regular file); fstat on the open file then has the last word.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        _require_regular(path, os.fstat(fd), limit)
        data = file.read(limit + 1)  # the size can grow after the stat: never read more than one byte too many
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {_bytes(limit)}", str(path))
    return data


def file_kind(mode: int) -> str | None:
    """What a non-regular file is ('a FIFO', 'a directory', ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _require_regular(path: Path, status: os.stat_result, limit: int) -> None:
    kind = file_kind(status.st_mode)
    if kind is not None:
        raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
    if status.st_size > limit:
        raise OSError(errno.EFBIG, f"larger than {_bytes(limit)}", str(path))


def _bytes(count: int) -> str:
    return f"{count // (1024 * 1024)} MiB" if count >= 1024 * 1024 else f"{count // 1024} KiB"
