"""Bounded YAML: PyYAML's SafeLoader, refusing alias bombs, recursive aliases and deep nesting while it composes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

# A real config uses a few aliases (`<<: *defaults` per entry) and a few hundred nodes. An alias bomb ("billion
# laughs") is a few hundred bytes that expand into billions of nodes; these limits refuse it while it is composed,
# before anything has expanded.
YAML_MAX_ALIASES = 100
YAML_MAX_NODES = 100_000  # counted with every alias expanded
YAML_MAX_DEPTH = 64  # PyYAML composes recursively: far deeper nesting would end in a RecursionError


class YamlRefused(yaml.MarkedYAMLError):
    """Valid YAML that is refused because it would expand beyond the limits above."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses alias bombs (billion laughs, merge-key bombs), recursive aliases and very deep
    nesting while it composes the document: checking after loading would be too late, since the expansion happens
    in what walks the loaded data (merge keys, ${ENV} expansion, validation)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._sizes: dict[yaml.Node, int] = {}  # a composed node -> how many nodes it stands for, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            return self._compose_alias(parent, index)
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise self._refused(f"nested more than {YAML_MAX_DEPTH} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        assert node is not None  # only the end of a stream composes to nothing, and that is no node event
        # Every child went through compose_node before its parent completes, so its size is known: one pass.
        size = self._sizes[node] = 1 + sum(self._sizes[child] for child in _children(node))
        if size > YAML_MAX_NODES:
            raise YamlRefused(
                problem=f"more than {YAML_MAX_NODES:,} nodes once aliases are expanded (an alias bomb?)",
                problem_mark=node.start_mark,
            )
        return node

    def _compose_alias(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        anchor = self._next_event().anchor
        target = self.anchors.get(anchor)
        if target is not None and target not in self._sizes:  # still being composed: the alias is inside it
            raise self._refused(f"alias *{anchor} is inside the node it refers to (a recursive alias)")
        self._aliases += 1
        if self._aliases > YAML_MAX_ALIASES:
            raise self._refused(f"more than {YAML_MAX_ALIASES} aliases (*name); the limit stops alias bombs")
        return super().compose_node(parent, index)  # an unknown anchor: PyYAML's own error

    def _refused(self, problem: str) -> YamlRefused:
        return YamlRefused(problem=problem, problem_mark=self._next_event().start_mark)

    def _next_event(self) -> Any:  # an AliasEvent, a NodeEvent: each has the start_mark and anchor used here
        return self.peek_event()  # type: ignore[no-untyped-call]


def _children(node: yaml.Node) -> Iterable[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value  # type: ignore[no-any-return]
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return ()


def load_bounded_yaml(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
