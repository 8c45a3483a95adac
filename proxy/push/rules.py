"""Push policies: a `push:` section (on an auth entry or an access client) compiled once, and bound to a client."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..config.push import PushPolicyConfig
from .patterns import Matcher, PatternError, RefPattern, any_choice_intersects
from .refnames import ref_name_problem

_BOUND_CACHE = 1024
_GLOBSTAR_ONLY = "**"  # bound policies kept per policy: one per client name seen


def describe(config: PushPolicyConfig) -> str:
    """The effective policy in one line, for `check`."""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    force = "yes" if config.force else f"no (fast-forwards checked, up to {_human(config.max_checked_pack_size)} held)"
    return f"refs {', '.join(config.refs)}; create {yes(config.create)}, delete {yes(config.delete)}, force {force}"


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


# ---------------------------------------------------------------- policies


@dataclass(frozen=True)
class BoundPolicy:
    """A policy with `{client}` filled in: what a request is checked against."""

    owner: str  # who set it, for messages: "auth entry 'acme-app'", "client 'run-42'"
    create: bool
    delete: bool
    force: bool
    max_checked_pack_size: int
    shown: tuple[str, ...]  # the patterns as this client reads them
    matchers: tuple[Matcher, ...] = field(repr=False)

    def allows_ref(self, ref: str) -> bool:
        return any(matcher.matches(ref) for matcher in self.matchers)

    @property
    def allows_every_ref(self) -> bool:
        """A pattern that matches every ref name (`**`, `refs/**`)."""
        return any(text in (_GLOBSTAR_ONLY, "refs/**") for text in self.shown)


@dataclass(frozen=True)
class PushPolicy:
    """A `push:` section, parsed once at load; `bind` gives it for one client (cached per name)."""

    owner: str
    config: PushPolicyConfig
    patterns: tuple[RefPattern, ...]
    _bound: dict[str | None, BoundPolicy] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, owner: str, config: PushPolicyConfig) -> PushPolicy:
        try:
            patterns = tuple(RefPattern(text) for text in config.refs)
        except PatternError as error:  # the model validated them already: only a model built by hand gets here
            raise ValueError(f"{owner}: {error}") from None
        return cls(owner, config, patterns)

    def bind(self, client: str | None) -> BoundPolicy:
        bound = self._bound.get(client)
        if bound is None:
            if len(self._bound) >= _BOUND_CACHE:
                self._bound.clear()
            bound = self._bound[client] = BoundPolicy(
                self.owner, self.config.create, self.config.delete, self.config.force,
                self.config.max_checked_pack_size,
                tuple(pattern.shown_for(client) for pattern in self.patterns),
                tuple(pattern.bind(client) for pattern in self.patterns),
            )  # fmt: skip
        return bound


# ---------------------------------------------------------------- LFS


def may_push_any(policies: Sequence[BoundPolicy]) -> bool:
    """An LFS upload is allowed to a party that may push at least one ref: some name matches a pattern of every
    policy (an entry's `refs/heads/a/**` and a client's `refs/heads/b/**` leave none). No policy: yes."""
    return not policies or _some_ref_passes_all(tuple(policies))


@functools.lru_cache(maxsize=_BOUND_CACHE)
def _some_ref_passes_all(policies: tuple[BoundPolicy, ...]) -> bool:
    return any_choice_intersects([policy.matchers for policy in policies])


def allows_every_ref(policies: Sequence[BoundPolicy]) -> bool:
    """Every policy allows every ref: a lock that names no ref (it holds on all of them) is within them."""
    return all(policy.allows_every_ref for policy in policies)


def lock_ref_allowed(ref_name: str, policies: Sequence[BoundPolicy]) -> bool:
    """An LFS lock request naming `ref.name`: allowed when the name is a valid ref every policy allows."""
    if not policies:
        return True
    return ref_name_problem(ref_name) is None and all(policy.allows_ref(ref_name) for policy in policies)
