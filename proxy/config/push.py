"""Push: the `push:` section of an auth entry or an access client: which ref updates a party may push."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from ..push.patterns import CLIENT, pattern_problem
from ..push.refnames import component_problem
from .base import Model
from .units import PositiveSize

DEFAULT_MAX_CHECKED_PACK = 1 << 30


def _usable_pattern(text: str) -> str:
    problem = pattern_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


PatternText = Annotated[str, AfterValidator(_usable_pattern)]


class PushPolicyConfig(Model):
    """Which ref updates a party may push. A ref update must match one of `refs` (`*` within a segment, `**`
    across segments, `{client}` the client's name); creating, deleting and non-fast-forward updates need
    `create`, `delete` and `force` too."""

    refs: list[PatternText] = Field(min_length=1, max_length=1000)
    create: bool = True
    delete: bool = False
    force: bool = False
    # A push whose fast-forwards must be checked is read until they are decided, onto disk; past this, it is
    # refused as undecidable. Most pushes are decided on their first commits (see push/gate.py).
    max_checked_pack_size: PositiveSize = DEFAULT_MAX_CHECKED_PACK

    @property
    def uses_client(self) -> bool:
        """Whether a pattern names `{client}`: refused at load where no client can be known."""
        return any(CLIENT in pattern for pattern in self.refs)


def client_name_problem(name: str) -> str | None:
    """Why a client's name cannot fill `{client}` (a '/', a character no ref may hold), or None. Such a name would
    match nothing, which is safe but surely not meant: config can refuse it at load."""
    problem = component_problem(name)
    return f"client name {name!r} cannot be used in {CLIENT}: {problem}" if problem else None
