"""The README's two commands, run as written in a copy of the tree without a .venv, as a newcomer would run them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README opens with a sh block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def fresh_copy(tmp_path: Path) -> Path:
    """The files a clone of the repo has (tracked or not ignored), without .venv or caches."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()  # fmt: skip
    copy = tmp_path / "git-token-proxy"
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy


def test_the_readme_opens_with_the_demo_and_the_tests() -> None:
    assert readme_commands() == ["scripts/demo", "scripts/test"]


def test_the_two_commands_run_as_written_on_a_tree_without_a_venv(tmp_path: Path) -> None:
    copy = fresh_copy(tmp_path)
    assert not (copy / ".venv").exists()
    # PYTHON: this interpreter (a fresh machine's python3); PATH without any .venv, as a new shell has it.
    env = {**os.environ, "PYTHON": sys.executable, "PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    env.pop("VIRTUAL_ENV", None)
    demo = subprocess.run(["scripts/demo"], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "no git client ever held a credential" in demo.stdout
    assert (copy / ".venv" / "bin" / "git-token-proxy").exists()
    # The test command, on one small module (the whole suite is what is running this very test).
    tests = subprocess.run(["scripts/test", "-q", "-p", "no:cacheprovider", "tests/test_routing.py"], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert tests.returncode == 0, tests.stdout[-2000:] + tests.stderr[-2000:]
    assert re.search(r"\d+ passed", tests.stdout)
