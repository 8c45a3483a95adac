"""Test parts we ship: a fake GitHub backed by real git, and an isolated git CLI. The demo and users' tests use them."""

from .fake_app_api import CannedAnswer, FakeApp, FakeAppApi, FakeInstallation, Grant
from .fake_github import FakeGitHub, SeenRequest
from .gitcli import GitResult, git_env, insteadof_env, run_git, run_git_sync
from .keys import generate_app_key, openssh_pem, pkcs1_pem, pkcs8_pem, public_pem

__all__ = [
    "CannedAnswer", "FakeApp", "FakeAppApi", "FakeGitHub", "FakeInstallation", "GitResult", "Grant", "SeenRequest",
    "generate_app_key", "git_env", "insteadof_env", "openssh_pem", "pkcs1_pem", "pkcs8_pem", "public_pem",
    "run_git", "run_git_sync",
]  # fmt: skip
