"""Fast-forward or not: walk the pushed commits from the new tip to the commits upstream has, then ask upstream."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

from .pack import KnownObjects

MAX_COMPARE_CALLS = 16  # per push: a merge brings two boundaries, a long-lived branch a few more
MAX_WALK = 100_000  # pushed commits walked per ref update
MAX_WALK_TOTAL = 400_000  # per push, over all its updates and both attempts: 1000 updates do not walk 1000 times
_PEEL_DEPTH = 8


class Ancestry(Enum):
    """GitHub's compare `status` of `base...head`."""

    AHEAD = "ahead"  # base is an ancestor of head
    IDENTICAL = "identical"
    BEHIND = "behind"  # head is an ancestor of base
    DIVERGED = "diverged"  # neither (GitHub's 404 "No common ancestor" too)


class UnknownCommit(Exception):
    """Upstream does not have one of the two commits (404)."""


class CompareFailed(Exception):
    """Upstream gave no usable answer (5xx, rate limit, timeout, a malformed body); the message says which."""


class _OutOfQuestions(Exception):
    """This push has asked upstream MAX_COMPARE_CALLS times already."""


CompareFn = Callable[[str, str], Awaitable[Ancestry]]  # (base, head): is base an ancestor of head?


class Outcome(Enum):
    FAST_FORWARD = "fast-forward"
    FORCE = "force"
    OPEN = "open"  # not yet: a commit may still come in the rest of the pack
    UNDECIDABLE = "undecidable"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    why: str = ""  # for UNDECIDABLE (and OPEN): what could not be known


@dataclass
class AncestryChecker:
    """One per push: remembers upstream's answers across refs and attempts, and counts the questions."""

    compare: CompareFn
    max_calls: int = MAX_COMPARE_CALLS
    max_walk: int = MAX_WALK
    max_walk_total: int = MAX_WALK_TOTAL
    calls: int = 0
    walked: int = 0  # commits walked so far, over every check
    _answers: dict[tuple[str, str], Ancestry | None] = field(default_factory=dict)  # None: upstream lacks one

    async def check(self, old: str, new: str, known: KnownObjects, *, final: bool) -> Verdict:
        """Whether `old` is an ancestor of `new`, from the pack's commits and upstream's answers. Not `final`:
        the pack is not over, so a commit not seen yet may still come (OPEN). A FAST_FORWARD or FORCE is final
        whenever it is given: every commit it rests on is either in the pack or known to upstream."""
        tip = _peeled(new, known)
        if isinstance(tip, Verdict):
            return tip
        limit = min(self.max_walk, self.max_walk_total - self.walked)
        walked, steps = _walk(tip, old, known, limit)
        self.walked += steps
        if isinstance(walked, Verdict):
            if walked.outcome is Outcome.UNDECIDABLE and steps >= limit and limit < self.max_walk:
                return Verdict(Outcome.UNDECIDABLE, f"more than {self.max_walk_total} new commits to walk in this push")
            return walked
        unknown, failed = [], ""
        for boundary in walked:
            try:
                answer = await self._ask(old, boundary)
            except CompareFailed as error:
                failed = f"GitHub's compare API failed ({error})"
                continue
            except _OutOfQuestions:
                failed = f"it takes more than {self.max_calls} questions to GitHub"
                continue
            if answer in (Ancestry.AHEAD, Ancestry.IDENTICAL):
                return Verdict(Outcome.FAST_FORWARD)
            if answer is None:
                unknown.append(boundary)
        if failed or unknown:
            why = failed or _missing(unknown[0])
            return Verdict(Outcome.UNDECIDABLE if final else Outcome.OPEN, why)
        return Verdict(Outcome.FORCE)

    async def _ask(self, old: str, boundary: str) -> Ancestry | None:
        if (old, boundary) in self._answers:
            return self._answers[old, boundary]
        if self.calls >= self.max_calls:
            raise _OutOfQuestions
        self.calls += 1
        try:
            answer: Ancestry | None = await self.compare(old, boundary)
        except UnknownCommit:
            answer = None
        self._answers[old, boundary] = answer  # failures are not kept: the next attempt asks again
        return answer


def _peeled(new: str, known: KnownObjects) -> str | Verdict:
    """The commit an annotated tag in the pack points at (a tag pushed over a tag); else `new` itself."""
    for _ in range(_PEEL_DEPTH):
        if new in known.unreadable:
            return Verdict(Outcome.UNDECIDABLE, f"object {new[:12]} in the push is malformed")
        target = known.tags.get(new)
        if target is None:
            return new
        new, kind = target
        if kind not in ("commit", "tag"):
            return Verdict(Outcome.UNDECIDABLE, f"the new value is a tag of a {kind}, not of a commit")
    return Verdict(Outcome.UNDECIDABLE, f"tags nested more than {_PEEL_DEPTH} deep")


def _walk(tip: str, old: str, known: KnownObjects, limit: int) -> tuple[list[str] | Verdict, int]:
    """Breadth-first from `tip` over the pushed commits: FAST_FORWARD on meeting `old`, else the boundary, the
    commits reached that the pack does not hold (in the order met: the closest first). With the number of
    commits it took in: no more than `limit`."""
    queue, seen, boundary = deque([tip]), {tip}, []
    while queue:
        commit = queue.popleft()
        if commit == old:
            return Verdict(Outcome.FAST_FORWARD), len(seen)
        if commit in known.unreadable:
            return Verdict(Outcome.UNDECIDABLE, f"commit {commit[:12]} in the push is malformed"), len(seen)
        parents = known.commits.get(commit)
        if parents is None:
            boundary.append(commit)
            continue
        for parent in parents:
            if parent not in seen:
                if len(seen) >= limit:
                    return Verdict(Outcome.UNDECIDABLE, f"more than {limit} new commits to walk"), len(seen)
                seen.add(parent)
                queue.append(parent)
    return boundary, len(seen)


def _missing(commit: str) -> str:
    return f"commit {commit[:12]} is neither in the push nor on GitHub"
