"""Test parts we ship: a fake GitHub backed by real git, and an isolated git CLI. The demo and users' tests use them."""

from .fake_github import FakeGitHub, SeenRequest, TokenGrant
from .gitcli import GitResult, git_env, insteadof_env, run_git, run_git_sync

__all__ = [
    "FakeGitHub", "GitResult", "SeenRequest", "TokenGrant", "git_env", "insteadof_env", "run_git", "run_git_sync",
]  # fmt: skip
