"""Applies a git delta (pack-format's copy/insert instructions) to a base held in memory: a commit or a tag."""

from __future__ import annotations


class DeltaError(ValueError):
    """A delta git's patch_delta would refuse: sizes that do not add up, a copy outside its base."""


class DeltaTooLarge(DeltaError):
    """A well-formed delta whose result is larger than the caller keeps."""


class DeltaTooLong(DeltaError):
    """A delta of more instructions than the caller has left to spend (each one is a step of Python)."""


def apply_delta(base: bytes, delta: bytes, max_result: int, max_steps: int) -> tuple[bytes, int]:
    """The object `delta` makes of `base` (patch-delta.c): two sizes, then instructions that either copy a range
    of the base or insert the bytes that follow them. Returns it with the number of instructions it took."""
    try:
        base_size, position = _size(delta, 0)
        result_size, position = _size(delta, position)
    except IndexError:
        raise DeltaError("a truncated delta header") from None
    if base_size != len(base):
        raise DeltaError(f"a delta for a base of {base_size} bytes, applied to {len(base)}")
    if result_size > max_result:
        raise DeltaTooLarge(f"a delta result of {result_size} bytes")
    out, steps = bytearray(), 0
    while position < len(delta):
        steps += 1
        if steps > max_steps:
            raise DeltaTooLong(f"a delta of more than {max_steps} instructions")
        op = delta[position]
        position += 1
        if op & 0x80:
            start, length, position = _copy_arguments(delta, position, op)
            if start + length > len(base):
                raise DeltaError("a copy past the end of the base")
            out += base[start : start + length]
        elif op:
            if position + op > len(delta):
                raise DeltaError("an insert past the end of the delta")
            out += delta[position : position + op]
            position += op
        else:
            raise DeltaError("the reserved instruction 0")
        if len(out) > result_size:
            raise DeltaError("a delta that makes more than it said")
    if len(out) != result_size:
        raise DeltaError("a delta that makes less than it said")
    return bytes(out), steps


def _size(delta: bytes, position: int) -> tuple[int, int]:
    """Little-endian base-128, as in the delta's header."""
    value = shift = 0
    while True:
        byte = delta[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position
        if shift > 63:
            raise DeltaError("a delta size over 2^64")


def _copy_arguments(delta: bytes, position: int, op: int) -> tuple[int, int, int]:
    """A copy's offset (up to 4 bytes) and length (up to 3), each byte present only if its bit in `op` is set;
    a length of 0 means 0x10000."""
    start = length = 0
    try:
        for index in range(4):
            if op & (1 << index):
                start |= delta[position] << (8 * index)
                position += 1
        for index in range(3):
            if op & (0x10 << index):
                length |= delta[position] << (8 * index)
                position += 1
    except IndexError:
        raise DeltaError("a copy instruction cut short") from None
    return start, length or 0x10000, position
