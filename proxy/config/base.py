"""Base: what every config model shares (camelCase keys, unknown keys refused, frozen) and the one error type."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo
from pydantic.alias_generators import to_camel


class ConfigError(Exception):
    """A config problem the operator can fix; the message names the key."""


class Model(BaseModel):
    """camelCase keys as in Concord (their snake_case spellings are accepted too); unknown keys are errors, so a
    typo never silently does nothing; frozen, so a running config never changes under a request."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


def from_config_folder(path: Path, info: ValidationInfo) -> Path:
    """A relative path in a config file names a file beside that file, wherever the proxy was started from: the
    same file then works from a shell, a systemd unit and a container alike."""
    path = path.expanduser()
    folder = info.context.get("config_folder") if isinstance(info.context, dict) else None
    return folder / path if isinstance(folder, Path) and not path.is_absolute() else path
