"""Messages: a validation error said as one line per problem, naming the key as the file writes it, with a guess
at what was meant for an unknown key."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, Tag, ValidationError

from .auth import ENTRY_TYPES
from .root import Config


def _format_location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ENTRY_TYPES:
            continue  # the discriminator tag pydantic puts in the path; the user never wrote it
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _closest_key(loc: tuple[int | str, ...]) -> str:
    """`server.prot` → "; did you mean 'port'?": the keys of the model at that place, by difflib (case folded, so
    `clientID` finds `clientId`)."""
    keys = _keys_at(Config, loc[:-1])
    given = str(loc[-1])
    by_folded = {key.casefold(): key for key in keys}
    close = difflib.get_close_matches(given.casefold(), list(by_folded), n=1, cutoff=0.6)
    return f"; did you mean {by_folded[close[0]]!r}?" if close else ""


def _keys_at(annotation: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The keys (aliases) of the model found by following `loc` from `annotation`; [] when none is there."""
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    for member in _members(annotation):
        model = _model_in(member)
        if model is not None:
            return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _step(annotation: Any, part: int | str) -> Any:
    """One step down a location: an item of a list, a field of a model, or a tagged member of a union."""
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if isinstance(part, int) and origin in (list, tuple):
            return typing.get_args(member)[0]
        model = _model_in(member)
        if model is not None and isinstance(part, str):
            for name, field in model.model_fields.items():
                if part in (name, field.alias):
                    return field.annotation
        tag = next((m for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)), None)
        if tag is not None and tag.tag == part:
            return member
    return None


def _members(annotation: Any) -> list[Any]:
    """A union's members (Annotated wrappers kept: they carry the discriminator's tags), or the one type."""
    inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        return list(typing.get_args(inner))
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def describe(error: ValidationError, empty: Mapping[str, str] | None = None) -> str:
    """One line per problem, each naming its key; `empty` maps a key to the variable that was set but empty."""
    lines = []
    for item in error.errors():
        location = _format_location(item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _closest_key(item["loc"])
        elif item["type"] == "unknown_type":
            given = item["input"].get("type") if isinstance(item["input"], Mapping) else None
            message = f"unknown type {given!r}; use GITHUB_APP_INSTALLATION or OAUTH_TOKEN"
            if not isinstance(item["input"], Mapping):
                message = "each auth entry must be a mapping of keys (id, type, urlPattern, ...)"
        message = message.removeprefix("Value error, ")
        if empty and location in empty:
            message += f" (${{{empty[location]}}} is set but empty)"
        lines.append(f"{location}: {message}")
    return "\n".join(lines)
