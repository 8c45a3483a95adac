"""Ref patterns (`refs/heads/agent/{client}/**`): parsed and checked at load, matched in linear time per request."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import re2

from .refnames import ref_name_problem

CLIENT = "{client}"
MAX_PATTERN = 1024
_GLOBSTAR = "**"
_ANY = None  # an edge label: any one character but '/'
_OTHER = "\x00"  # in an intersection, the stand-in for every character no pattern names (never in a ref)
_MAX_PRODUCT_STATES = 50_000


class PatternError(ValueError):
    """A pattern that cannot be used; the message says why, and the config loader names the key."""


@dataclass(frozen=True)
class RefPattern:
    """One pattern as written. `{client}` is filled in by `bind`, as literal characters: a client's name cannot
    add pattern syntax, and a name with a '/' (never inside one component) matches nothing."""

    text: str
    segments: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problem = pattern_problem(self.text)
        if problem is not None:
            raise PatternError(problem)
        object.__setattr__(self, "segments", tuple(self.text.split("/")))

    @property
    def uses_client(self) -> bool:
        return CLIENT in self.text

    def shown_for(self, client: str | None) -> str:
        return self.text.replace(CLIENT, client) if client is not None else self.text

    def bind(self, client: str | None) -> Matcher:
        if self.uses_client and (client is None or "/" in client):
            return Matcher.nothing()
        return Matcher.build(self.segments, client or "")


def pattern_problem(text: str) -> str | None:
    """Why `text` is not a usable pattern, or None. Every pattern must be able to match some valid ref name: one
    that cannot (`refs/heads/*.lock`, a typo like `refs/head//x`) would silently allow nothing."""
    if not text or len(text) > MAX_PATTERN:
        return f"pattern {text[:60]!r} is empty or over {MAX_PATTERN} characters"
    if any(char in "{}" for char in text.replace(CLIENT, "")):
        return f"pattern {text!r} has a '{{' or '}}' that is not part of {CLIENT} (the only placeholder)"
    segments = text.split("/")
    if segments[0] not in ("refs", _GLOBSTAR):
        return f"pattern {text!r} must start with refs/ (or **): it is matched against full ref names"
    if any(_GLOBSTAR in part and part != _GLOBSTAR for part in segments):
        return f"pattern {text!r}: '**' must be a whole path segment, as in refs/heads/agent/**"
    if any(CLIENT in part and "*" in part for part in segments):
        # `refs/heads/{client}*`: client 'a' would match refs/heads/alice, another client's names.
        return (
            f"pattern {text!r}: {CLIENT} and '*' in one segment would let a client reach another's names; "
            f"give {CLIENT} a segment of its own, as in refs/heads/agent/{CLIENT}/**"
        )
    # One ref the pattern matches, with every wildcard and the client's name filled in: if even that is not a
    # valid ref, none is (a wildcard cannot remove a '.lock', a leading '.' or a '..').
    sample = "/".join(_sample_segment(part, index) for index, part in enumerate(segments))
    problem = ref_name_problem(sample)
    if problem is not None:
        return f"pattern {text!r} can match no valid ref name: {problem}"
    return None


def _sample_segment(part: str, index: int) -> str:
    if part == _GLOBSTAR:
        return "refs/x" if index == 0 else "x"
    return part.replace(CLIENT, "client").replace("*", "x")


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class Matcher:
    """A pattern as a small NFA over characters: `*` is a state looping on any character but '/', and `**` a loop
    over whole segments. Refs are matched with the same pattern compiled by RE2 (linear time, no backtracking for
    a hostile client to exploit, and in C: a list of 10,000 refs costs milliseconds, where simulating the NFA in
    Python cost seconds); the NFA stays for what RE2 cannot answer, whether two patterns share a ref."""

    edges: tuple[tuple[tuple[str | None, int], ...], ...]
    skips: tuple[tuple[int, ...], ...]  # epsilon moves
    accept: int  # -1: matches nothing
    compiled: Any = field(default=None, compare=False, repr=False)  # the RE2 form; None: matches nothing

    @classmethod
    def nothing(cls) -> Matcher:
        return cls(((),), ((),), -1)

    @classmethod
    def build(cls, segments: Sequence[str], client: str) -> Matcher:
        builder = _Builder()
        current = builder.state()
        last = len(segments) - 1
        for index, part in enumerate(segments):
            if part == _GLOBSTAR:
                current = builder.segments_loop(current, at_least_one=index == last)
                continue  # a `**` before the end takes its '/' with it: `a/**/b` matches `a/b`
            for char in _expand(part, client):
                current = builder.star(current) if char is _ANY else builder.char(current, char)
            if index < last:
                current = builder.char(current, "/")
        edges, skips = tuple(map(tuple, builder.edges)), tuple(map(tuple, builder.skips))
        return cls(edges, skips, current, re2.compile(_regex(segments, client)))

    def matches(self, text: str) -> bool:
        return self.compiled is not None and self.compiled.fullmatch(text) is not None

    def matches_by_simulation(self, text: str) -> bool:
        """The NFA's own answer (what the RE2 form must agree with: the tests compare them)."""
        if self.accept < 0:
            return False
        states = self._closure({0})
        for char in text:
            states = self._closure(self._step(states, char))
            if not states:
                return False
        return self.accept in states

    def _step(self, states: Iterable[int], char: str) -> set[int]:
        return {
            target
            for state in states
            for label, target in self.edges[state]
            if label == char or (label is _ANY and char != "/")
        }

    def _closure(self, states: set[int]) -> set[int]:
        pending, reached = list(states), set(states)
        while pending:
            for target in self.skips[pending.pop()]:
                if target not in reached:
                    reached.add(target)
                    pending.append(target)
        return reached


def _regex(segments: Sequence[str], client: str) -> str:
    """The pattern as a regular expression, exactly as the NFA reads it: `*` is `[^/]*`; `**` inside a pattern is
    zero or more whole `segment/`, at its end one or more segments; `{client}` is the name, escaped."""
    out, last = [], len(segments) - 1
    for index, part in enumerate(segments):
        if part == _GLOBSTAR:
            out.append("[^/]+(?:/[^/]+)*" if index == last else "(?:[^/]+/)*")
            continue
        pieces = [re.escape(client) if piece == CLIENT else _segment_regex(piece) for piece in _split_client(part)]
        out.append("".join(pieces) + ("/" if index < last else ""))
    return "".join(out)


def _split_client(part: str) -> list[str]:
    pieces: list[str] = []
    for index, piece in enumerate(part.split(CLIENT)):
        if index:
            pieces.append(CLIENT)
        if piece:
            pieces.append(piece)
    return pieces


def _segment_regex(piece: str) -> str:
    return "[^/]*".join(re.escape(literal) for literal in piece.split("*"))


def _expand(part: str, client: str) -> list[str | None]:
    """A segment's characters, `*` as _ANY and `{client}` as the name's own characters."""
    out: list[str | None] = []
    for index, piece in enumerate(part.split(CLIENT)):
        if index:
            out.extend(client)
        out.extend(_ANY if char == "*" else char for char in piece)
    return out


class _Builder:
    def __init__(self) -> None:
        self.edges: list[list[tuple[str | None, int]]] = []
        self.skips: list[list[int]] = []

    def state(self) -> int:
        self.edges.append([])
        self.skips.append([])
        return len(self.edges) - 1

    def char(self, source: int, label: str) -> int:
        target = self.state()
        self.edges[source].append((label, target))
        return target

    def star(self, source: int) -> int:
        target = self.state()
        self.skips[source].append(target)
        self.edges[target].append((_ANY, target))
        return target

    def segments_loop(self, source: int, *, at_least_one: bool) -> int:
        """`**`: inside a pattern, zero or more `segment/` (back to `source`); at its end, one or more segments
        (`refs/heads/agent/**` does not match `refs/heads/agent` itself, as in .gitignore)."""
        inside = self.state()
        self.edges[source].append((_ANY, inside))
        self.edges[inside].append((_ANY, inside))
        self.edges[inside].append(("/", source))
        return inside if at_least_one else source


# ---------------------------------------------------------------- intersections


def some_ref_matches_all(matchers: Sequence[Matcher]) -> bool:
    """Whether one name matches every matcher: the product of their NFAs has a path to an accepting state. The
    alphabet is every character a pattern names, '/', and one stand-in for all the others."""
    if any(matcher.accept < 0 for matcher in matchers):
        return False
    alphabet = {"/", _OTHER} | {label for m in matchers for row in m.edges for label, _ in row if label is not _ANY}
    start = tuple(frozenset(m._closure({0})) for m in matchers)
    seen, pending = {start}, [start]
    while pending:
        if len(seen) > _MAX_PRODUCT_STATES:
            return False  # patterns no operator writes: not proven, so not allowed
        states = pending.pop()
        if all(m.accept in s for m, s in zip(matchers, states, strict=True)):
            return True
        for char in alphabet:
            moved = tuple(frozenset(m._closure(m._step(s, char))) for m, s in zip(matchers, states, strict=True))
            if all(moved) and moved not in seen:
                seen.add(moved)
                pending.append(moved)
    return False


def any_choice_intersects(groups: Sequence[Sequence[Matcher]]) -> bool:
    """Whether some name matches one matcher of every group (each group: one policy's patterns)."""
    return any(some_ref_matches_all(choice) for choice in product(*groups))
