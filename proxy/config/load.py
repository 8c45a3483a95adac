"""Load: a config file read with bounds, `${ENV}` expanded, validated, then the files it names read once, with
every mistake said as one line naming its key (and never a value that came from the environment)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..bounded_yaml import YamlRefused, load_bounded_yaml
from ..files import read_regular_file
from .base import ConfigError
from .files import CONFIG_MAX_BYTES, NamedFileProblem, read_named_files, read_problem
from .messages import describe
from .root import Config

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class _FromEnvironment:
    """What `${VAR}` expansion took from the environment, for messages: `values` maps each value to its variable
    (so that no message echoes one), `empty` maps a key's location to the variable that was set but empty."""

    values: dict[str, str] = field(default_factory=dict)
    empty: dict[str, str] = field(default_factory=dict)


def _expand_env(value: Any, location: str, taken: _FromEnvironment) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string; a missing variable names its key."""
    if isinstance(value, str):

        def substitute(ref: re.Match[str]) -> str:
            name, default = ref.group(1), ref.group(2)
            if name in os.environ:
                taken.values[os.environ[name]] = name
                if not os.environ[name].strip():
                    taken.empty[location] = name
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{location}: environment variable {name} is not set")

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{location}.{k}" if location else str(k), taken) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{location}[{i}]", taken) for i, v in enumerate(value)]
    return value


def _hide_environment(message: str, used: dict[str, str]) -> str:
    """A validator may quote the value it refused; when that value came from the environment, it may be any
    secret of the pod (a key put where a duration belongs): the message names the variable instead."""
    for value in sorted(used, key=len, reverse=True):
        if len(value) >= 3:
            message = message.replace(value, f"<value of ${{{used[value]}}}>")
    return message


def parse_config(data: Any, source: str = "config", config_folder: Path | None = None) -> Config:
    """Validate already-loaded YAML data, then read the files it names; every problem is one line naming its key.
    Relative file paths in it name files in `config_folder` (the config file's own folder)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    taken = _FromEnvironment()
    try:
        config = Config.model_validate(_expand_env(data, "", taken), context={"config_folder": config_folder})
        return read_named_files(config)
    except ConfigError as error:
        raise ConfigError(_hide_environment(f"{source}: {error}", taken.values)) from None
    except ValidationError as error:
        described = describe(error, taken.empty)
        # One mistake, one line; several get a line each, under a heading.
        separator = ": " if "\n" not in described else "\n"
        message = f"{source}: invalid configuration{separator}{described}"
        raise ConfigError(_hide_environment(message, taken.values)) from None
    except NamedFileProblem as problem:
        message = f"{source}: invalid configuration: {problem.location}: {problem}"
        raise ConfigError(_hide_environment(message, taken.values)) from None


_DOUBLE_QUOTED_REGEX_HINT = (
    "; in double quotes YAML reads backslashes itself: write patterns in single quotes, "
    "'(?<baseUrl>github\\.com)/.*', or double each backslash"
)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """The problem and its position only: PyYAML's own message quotes the offending line, which may hold a token."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)
    # `"(?<baseUrl>github\.com)"` is the likeliest way to meet this: a regex escape inside a double-quoted string.
    return where + (_DOUBLE_QUOTED_REGEX_HINT if "unknown escape character" in str(problem) else "")


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file. Whatever the file holds, this takes bounded time and memory and
    fails only with a ConfigError naming the file: `--watch` and SIGHUP load whatever lands at that path."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        data = load_bounded_yaml(text)
    except YamlRefused as error:
        raise ConfigError(f"{path}: refused: {_yaml_problem(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except (ValueError, OverflowError):
        # PyYAML converts a date such as 2024-13-45, or an integer of thousands of digits, with Python's own
        # constructors; their messages are not PyYAML's, so say plainly what kind of value it is.
        raise ConfigError(f"{path}: not valid YAML: a number or date is out of range") from None
    return parse_config(data, str(path), path.absolute().parent)


def _read_config_text(path: Path) -> str:
    try:
        raw = read_regular_file(path, CONFIG_MAX_BYTES)
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL byte in it
        raise ConfigError(f"{path}: cannot read config file: {read_problem(error)}") from None
    try:
        return raw.decode()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8: byte {raw[error.start]:#04x} at offset {error.start}") from None
