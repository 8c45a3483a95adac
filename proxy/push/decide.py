"""Which ref updates a push may make: each command against every policy, then all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from .commands import Kind, RefUpdate
from .refnames import ref_name_problem
from .rules import BoundPolicy

_SHOWN_PATTERNS = 5


class Reason(Enum):
    """Why a push was refused: the `reason` label of git_token_proxy_push_refused_total."""

    REF = "ref"
    CREATE = "create"
    DELETE = "delete"
    FORCE = "force"
    MALFORMED = "malformed"
    UNDECIDABLE = "undecidable"


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str  # what git prints in parentheses after `[remote rejected]`
    atomic: bool = False  # allowed on its own, refused with another


@dataclass(frozen=True)
class RefCheck:
    """One command after the ref rules: refused, or allowed pending a fast-forward proof (`needs_ancestry`)."""

    update: RefUpdate
    refusal: Refusal | None = None
    needs_ancestry: bool = False


def check_refs(updates: Sequence[RefUpdate], policies: Sequence[BoundPolicy], who: str) -> list[RefCheck]:
    """Each command against every policy (an entry's and a client's: a command must pass both). `who` names the
    party in messages: the client's name, else the auth entry's id."""
    return [_check_one(update, policies, who) for update in updates]


def _check_one(update: RefUpdate, policies: Sequence[BoundPolicy], who: str) -> RefCheck:
    problem = ref_name_problem(update.ref)
    if problem is not None:
        return RefCheck(update, Refusal(Reason.MALFORMED, f"{update.ref} is not a valid ref name: {problem}"))
    for policy in policies:
        refusal = _policy_refusal(update, policy, who, len(policies) > 1)
        if refusal is not None:
            return RefCheck(update, refusal)
    forced_checked = update.kind is Kind.UPDATE and any(not policy.force for policy in policies)
    return RefCheck(update, needs_ancestry=forced_checked)


def _policy_refusal(update: RefUpdate, policy: BoundPolicy, who: str, several: bool) -> Refusal | None:
    by = f" (set by {policy.owner})" if several else ""
    if not policy.allows_ref(update.ref):
        return Refusal(Reason.REF, f"push to {update.ref} is not allowed for '{who}'; allowed: {_shown(policy)}{by}")
    if update.kind is Kind.CREATE and not policy.create:
        return Refusal(Reason.CREATE, f"creating {update.ref} is not allowed for '{who}' (push.create: false){by}")
    if update.kind is Kind.DELETE and not policy.delete:
        return Refusal(Reason.DELETE, f"deleting {update.ref} is not allowed for '{who}' (push.delete: false){by}")
    return None


def _shown(policy: BoundPolicy) -> str:
    shown = ", ".join(policy.shown[:_SHOWN_PATTERNS])
    more = len(policy.shown) - _SHOWN_PATTERNS
    return f"{shown} and {more} more" if more > 0 else shown


def force_refusal(update: RefUpdate, who: str) -> Refusal:
    return Refusal(
        Reason.FORCE,
        f"non-fast-forward update of {update.ref} is not allowed for '{who}' (push.force: false); "
        "fetch, then rebase or merge, and push again",
    )


def undecidable_refusal(update: RefUpdate, why: str) -> Refusal:
    return Refusal(
        Reason.UNDECIDABLE,
        f"cannot tell whether the update of {update.ref} is a fast-forward: {why}; fetch, rebase or merge onto "
        "the branch, and push again (or ask for push.force: true)",
    )


# ---------------------------------------------------------------- all or nothing


@dataclass(frozen=True)
class Settled:
    """Every command's result. `refused` is the first refusal (the metric's reason), None when all may go."""

    results: tuple[tuple[RefUpdate, Refusal | None], ...]
    refused: Refusal | None


def settle(updates: Sequence[RefUpdate], refusals: dict[str, Refusal]) -> Settled:
    """One refused command refuses the push: the others are refused as `atomic: <ref> is not allowed`, as
    receive-pack words an atomic push that failed, so that git shows each ref's fate."""
    first = next((update for update in updates if update.ref in refusals), None)
    if first is None:
        return Settled(tuple((update, None) for update in updates), None)
    atomic = Refusal(refusals[first.ref].reason, f"atomic: {first.ref} is not allowed", atomic=True)
    results = tuple((update, refusals.get(update.ref, atomic)) for update in updates)
    return Settled(results, refusals[first.ref])
