"""Ref names as git's `check-ref-format` accepts them: a pushed name git would call "funny" is refused first."""

from __future__ import annotations

# Characters git never allows in a ref name (refs.c, `refname_disposition`): controls and space, the revision
# syntax (~ ^ :), the glob syntax (? * [) and the backslash.
_FORBIDDEN = frozenset(chr(code) for code in range(0x20)) | frozenset(" ~^:?*[\\\x7f")
MAX_REF_NAME = 1024  # GitHub refuses far shorter names; a longer one is a probe, not a branch


def ref_name_problem(name: str) -> str | None:
    """Why git would refuse `name` as a full ref name (`git check-ref-format <name>`), or None when it is valid.
    Pushed names must also live under `refs/`: receive-pack calls anything else a "funny refname"."""
    if not name:
        return "an empty ref name"
    if len(name) > MAX_REF_NAME:
        return f"a ref name over {MAX_REF_NAME} characters"
    if not name.startswith("refs/"):
        return "a ref name outside refs/"
    if name == "@" or "@{" in name or ".." in name:
        return "'@{' or '..' in a ref name"
    if any(char in _FORBIDDEN for char in name):
        return "a control character, space or one of ~^:?*[\\ in a ref name"
    if name.endswith(("/", ".")):
        return "a ref name ending in '/' or '.'"
    return next(filter(None, (_component_problem(part) for part in name.split("/"))), None)


def is_valid_ref_name(name: str) -> bool:
    return ref_name_problem(name) is None


def _component_problem(component: str) -> str | None:
    if not component:
        return "an empty component ('//') in a ref name"
    if component.startswith("."):
        return "a ref name component starting with '.'"
    if component.endswith(".lock"):
        return "a ref name component ending in '.lock'"
    return None


def component_problem(text: str) -> str | None:
    """Why `text` cannot be one whole component of a ref name (a client's name in `{client}`), or None."""
    if "/" in text:
        return "contains '/'"
    return ref_name_problem(f"refs/{text}")
