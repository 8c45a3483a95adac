"""Import structure: each module of `proxy` imports alone, and no import cycle exists, not even one for types only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = "proxy"

# argv: third-party modules, "--", then the project's modules. The third-party ones are loaded once, before the
# forks: what is checked is the order among the project's own modules, and paying aiohttp's and pydantic's start-up
# once per module would make this test slow. Each project module is then imported in a fork of that interpreter,
# which has loaded nothing of the project: alone, as a fresh interpreter would import it. Forks run one per CPU.
IMPORT_EACH_ALONE = """
import importlib, os, sys, traceback

split = sys.argv.index("--")
for name in sys.argv[1:split]:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # an extra that is not installed: the project module that needs it fails below, if it matters


def import_alone(name):
    try:
        importlib.import_module(name)
    except BaseException:
        sys.stderr.write(f"--- import {name}, alone:\\n{traceback.format_exc()}")  # one write: no interleaving
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def reap(running, failed):
    child, status = os.wait()
    name = running.pop(child)
    if status:
        failed.append(name)


failed, running = [], {}
for name in sys.argv[split + 1:]:
    if len(running) == (os.cpu_count() or 1):
        reap(running, failed)
    child = os.fork()
    if child == 0:
        import_alone(name)
    running[child] = name
while running:
    reap(running, failed)
print(" ".join(sorted(failed)))
sys.exit(1 if failed else 0)
"""


@dataclass
class ImportGraph:
    """The project's modules and, for each, the project modules it names in an import statement: at the top, under
    `if TYPE_CHECKING:`, or inside a function. Importing `a.b.c` is an arrow to `a.b.c` alone, not to its parent
    packages: a package that re-exports its submodules is no cycle."""

    root: Path
    files: dict[str, Path]
    arrows: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> module it imports -> line
    external: set[str] = field(default_factory=set)  # third-party and standard modules named anywhere

    def cycles(self) -> list[list[str]]:
        """Every module that can reach itself gives the shortest cycle through it; each cycle is listed once."""
        found: set[tuple[str, ...]] = set()
        for start in sorted(self.arrows):
            cycle = self._shortest_cycle(start)
            if cycle:
                turn = cycle.index(min(cycle))
                found.add(tuple(cycle[turn:] + cycle[:turn]))
        return [list(cycle) for cycle in sorted(found)]

    def _shortest_cycle(self, start: str) -> list[str]:
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            module = queue.popleft()
            for target in self.arrows.get(module, {}):
                if target == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                if target not in came_from:
                    came_from[target] = module
                    queue.append(target)
        return []

    def describe(self, cycle: list[str]) -> str:
        """`a -(a.py:12)-> b -(b.py:3)-> a`: each arrow with the import line that draws it."""
        text = cycle[0]
        for module, target in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
            where = f"{self.files[module].relative_to(self.root)}:{self.arrows[module][target]}"
            text += f" -({where})-> {target}"
        return text


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> ImportGraph:
    files = {_module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
    graph = ImportGraph(root, files)
    for module, path in files.items():
        arrows = graph.arrows.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target, line in _imported(node, module, path.name == "__init__.py"):
                if target.split(".")[0] != package:
                    graph.external |= {target, target.rpartition(".")[0]} - {""}  # `from x import y`: x, or x.y
                    continue
                known = _known_prefix(target, files)
                if known is not None and known != module:
                    arrows[known] = min(line, arrows.get(known, line))  # the first line that imports it
    return graph


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """The dotted names an import statement loads: for `from x import y`, `x.y` (a submodule, if there is one:
    `_known_prefix` falls back to `x` otherwise)."""
    if isinstance(node, ast.Import):
        return [(alias.name, node.lineno) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [(f"{base}.{alias.name}", node.lineno) for alias in node.names]


def _known_prefix(name: str, files: dict[str, Path]) -> str | None:
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    graph = import_graph()
    # `__main__` modules are entry points: importing one runs the command.
    modules = [name for name in graph.files if name.rpartition(".")[2] != "__main__"]
    third_party = sorted(name for name in graph.external if name.split(".")[0] not in sys.stdlib_module_names)
    command = [sys.executable, "-c", IMPORT_EACH_ALONE, *third_party, "--", *modules]
    # PYTHONPATH: this tree's package, installed or not.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"modules that fail to import alone: {result.stdout}\n{result.stderr}"


def test_no_import_cycle_not_even_for_types_or_inside_functions() -> None:
    graph = import_graph()
    cycles = graph.cycles()
    assert cycles == [], "import cycles in proxy:\n" + "\n".join(graph.describe(cycle) for cycle in cycles)


def test_the_graph_finds_cycles_closed_by_types_by_functions_and_through_packages(tmp_path: Path) -> None:
    """What the cycle test rests on, on a package written for it: each way a cycle can hide is found, and a
    package that re-exports its submodules is not one."""
    modules = {
        "__init__.py": "",
        "types_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .lazy import Lazy\n",
        "lazy.py": "def late() -> None:\n    from . import types_only\n",
        "flat.py": "from .nested import value\n",
        "nested/__init__.py": "from ..flat import other\n",
        "partial/__init__.py": "from .inner import name\n",
        "partial/inner.py": "from . import defined_in_init\n",
        "reexports/__init__.py": "from .first import one\n",
        "reexports/first.py": "from .second import two\nimport demo.reexports.second\n",
        "reexports/second.py": "two = 2\n",
    }
    for name, text in modules.items():
        (tmp_path / "demo" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "demo" / name).write_text(text)
    graph = import_graph(tmp_path, "demo")
    assert graph.cycles() == [
        ["demo.flat", "demo.nested"],
        ["demo.lazy", "demo.types_only"],
        ["demo.partial", "demo.partial.inner"],
    ]
    assert graph.describe(["demo.lazy", "demo.types_only"]) == (
        "demo.lazy -(demo/lazy.py:2)-> demo.types_only -(demo/types_only.py:3)-> demo.lazy"
    )
    assert "typing" in graph.external
