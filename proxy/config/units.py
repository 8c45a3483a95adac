"""Units: durations (`30s`, `50m`, Concord's `"50 minutes"`) and sizes (`10GiB`) as the config writes them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_duration(value: Any) -> float:
    """Seconds from `30s`, `50m`, `1h30m`, Concord's `"50 minutes"`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 50m or '50 minutes'")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 50m or '50 minutes'")
    text = value.strip().lower()
    total, position = 0.0, 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if not part or part.end() == position or part.group(2) not in _DURATION_UNITS | {"": 1}:
            raise ValueError(f"{value!r} is not a duration; use e.g. 30s, 50m, 1h or '50 minutes'")
        total += float(part.group(1)) * _DURATION_UNITS.get(part.group(2), 1)
        position = part.end()
    if position == 0:
        raise ValueError("empty duration")
    return total


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kib|mib|gib|tib|kb|mb|gb|tb)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip


def parse_size(value: Any) -> int:
    """Bytes from `20GiB`, `500MiB`, `10GB` or a bare number of bytes."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a size such as 10GiB or 500MiB")
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError("not a size; use e.g. 10GiB, 500MiB or 20GB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
PositiveId = Annotated[int, Field(strict=True, gt=0, lt=2**63)]
Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
