"""Entry: the `git-token-proxy` command. git starts the credential helper for every operation, so it is dispatched
before anything heavy loads; every other command goes to `cli`."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["credential-helper"]:
        from .credential_helper import main as credential_helper

        return credential_helper(arguments[1:])
    from .cli import main as cli

    return cli(arguments)
