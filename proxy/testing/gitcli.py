"""Runs the real git CLI in an isolated environment: no user config, no credential helper, never a prompt."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Printed by git when it would have asked for a username or password. Tests assert it never appears.
PROMPT_MARKERS = ("could not read Username", "could not read Password", "terminal prompts disabled")


def git_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",  # a prompt becomes an error we can see instead of a hang
        "GIT_ASKPASS": "",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.com",
    }
    env.update(extra or {})
    return env


def insteadof_env(proxy_url: str, host: str = "github.com", index: int = 0) -> dict[str, str]:
    """The URL rewrite a user configures, as GIT_CONFIG_* variables (no file to write)."""
    return {
        "GIT_CONFIG_COUNT": str(index + 1),
        f"GIT_CONFIG_KEY_{index}": f"url.{proxy_url.rstrip('/')}/{host}/.insteadOf",
        f"GIT_CONFIG_VALUE_{index}": f"https://{host}/",
    }


@dataclass(frozen=True)
class GitResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def prompted(self) -> bool:
        return any(marker in self.stderr for marker in PROMPT_MARKERS)

    def check(self) -> GitResult:
        if self.returncode != 0:
            raise AssertionError(f"git {' '.join(self.args)} failed ({self.returncode}):\n{self.stderr}")
        return self


async def run_git(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> GitResult:
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=dict(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return GitResult(args, process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


def run_git_sync(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> GitResult:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=dict(env), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    return GitResult(args, done.returncode, done.stdout, done.stderr)
