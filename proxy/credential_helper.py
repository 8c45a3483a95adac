"""Credential helper: git's credential helper protocol, answering `get` with the token a file holds now (a
projected service-account token is rotated in place). git starts it for every operation, so it imports nothing
but the standard library and `proxy.files`: `git-token-proxy credential-helper` is dispatched before the rest of
the CLI loads (see `proxy.entry`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .files import read_regular_file

HELPER_USERNAME = "x-token"  # any username will do: the proxy reads the password; this one says what it is
TOKEN_FILE_LIMIT = 64 * 1024  # the proxy refuses tokens over 8 KiB anyway


class TokenFileProblem(Exception):
    """The token file cannot be used; one line for git's terminal."""


def credential_helper(action: str, token_file: Path, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> int:
    """git's credential helper protocol. `get`: the attributes git sends are read (to the blank line), then
    `username` and `password=<the file's token, read now>`. Without a usable token it answers `quit=1`, so that
    git stops there (`fatal: credential helper '...' told us to quit`) instead of prompting for a password.
    `store`, `erase` and unknown actions do nothing: the token lives in the file, and the protocol says to
    ignore what a helper does not know."""
    if action != "get":
        return 0
    for line in stdin:  # git writes the request and waits for it to be read; a blank line ends it
        if not line.strip():
            break
    try:
        token = read_token(token_file)
    except TokenFileProblem as error:
        stderr.write(f"git-token-proxy credential-helper: {error}\n")
        stdout.write("quit=1\n")
        return 1
    stdout.write(f"username={HELPER_USERNAME}\npassword={token}\n")
    return 0


def read_token(path: Path) -> str:
    """The token a file holds: one line of printable ASCII (the kubelet writes it without a newline)."""
    try:
        data = read_regular_file(path, TOKEN_FILE_LIMIT)
    except (OSError, ValueError) as error:
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
        raise TokenFileProblem(f"cannot read token file {path}: {reason}") from None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenFileProblem(f"token file {path} holds bytes that are not ASCII, so not a token") from None
    if not token:
        raise TokenFileProblem(f"token file {path} is empty (has the token been written yet?)")
    if not token.isprintable() or any(char.isspace() for char in token):
        raise TokenFileProblem(f"token file {path} holds more than one line or word: it must hold the token alone")
    return token


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="git-token-proxy credential-helper",
        description="git credential helper: answers `get` with the token a file holds now (read on every call).",
        epilog="example:\n  git config --global credential.http://127.0.0.1:8080.helper \\\n"
        "    '!git-token-proxy credential-helper --token-file /var/run/secrets/tokens/git-token-proxy'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--token-file", required=True, type=Path, metavar="PATH", help="the file holding the token")
    parser.add_argument("action", metavar="ACTION", help="what git asks: get (store and erase do nothing)")
    args = parser.parse_args(argv)
    return credential_helper(args.action, args.token_file, sys.stdin, sys.stdout, sys.stderr)
