"""YAML documents read as plain data (mappings, lists, text, numbers, booleans, null), safely.

PyYAML's safe loader already refuses Python objects, but an anchor referenced by aliases at
several levels expands exponentially when the document is walked (nine levels of ten
aliases: 10^9 nodes), and an alias inside its own anchor is a cycle. Both are refused here
from the composed node graph, before anything walks it: its expanded size is counted in
linear time (each distinct node once). Merge keys (`<<: *defaults`) are expanded as YAML
1.1 defines them, and count toward the budget.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import yaml

MAX_EXPANDED_NODES = 100_000  # far beyond any config or recipe, far below what exhausts memory


class YamlInputError(ValueError):
    """A YAML document that is not plain data; the message names the source and line."""


def _problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return at + " ".join(str(getattr(error, "problem", None) or error).split())


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Nodes the document has once every alias is expanded; refuses cycles and documents
    over MAX_EXPANDED_NODES."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative: a deeply nested document must not hit Python's recursion limit
        node, children_done = stack.pop()
        ident = id(node)
        if children_done:
            active.discard(ident)
            children = _children(node)
            sizes[ident] = min(1 + sum(sizes[id(c)] for c in children), MAX_EXPANDED_NODES + 1)
            if sizes[ident] > MAX_EXPANDED_NODES:
                raise YamlInputError(f"{source}: line {node.start_mark.line + 1}: the document expands to more than "
                                     f"{MAX_EXPANDED_NODES:,} values through its aliases (&anchor / *alias): refused")
            continue
        if ident in sizes:
            continue
        if ident in active:
            raise YamlInputError(f"{source}: line {node.start_mark.line + 1}: an alias refers to the value that "
                                 "holds it (a recursive document): refused")
        active.add(ident)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def compose(text: str, source: str) -> yaml.Node | None:
    """The document's node graph, checked (see the module docstring); None for an empty one."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise YamlInputError(f"{source}: not valid YAML ({_problem(e)})") from None
    if node is not None:
        _expanded_size(node, source)
    return node


def to_plain(node: yaml.Node, source: str, lines: dict[str, int] | None = None, key: str = "") -> Any:
    """The data of a checked node graph; `lines` gets {"genome.models[1]": line} for messages.
    Keys given twice are refused; dates, binary and tagged values are not plain data."""
    return _PlainReader(source, lines).value(node, key)


@dataclasses.dataclass(frozen=True)
class _PlainReader:
    """`to_plain`'s walk of one document: `key` is the dotted name of the value at hand."""

    source: str
    lines: dict[str, int] | None
    constructor: yaml.SafeLoader = dataclasses.field(default_factory=lambda: yaml.SafeLoader(""))

    def value(self, node: yaml.Node, key: str) -> Any:
        if self.lines is not None:
            self.lines[key] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, key)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(v, f"{key}[{i}]") for i, v in enumerate(node.value)]
        return self.scalar(node, key)

    def mapping(self, node: yaml.MappingNode, key: str) -> dict:
        try:
            self.constructor.flatten_mapping(node)  # `<<:` merge keys, as YAML 1.1 defines them
        except yaml.YAMLError as e:
            raise YamlInputError(f"{self.source}: {_problem(e)}") from None
        out = {}
        for k, v in node.value:
            name = self.scalar(k, key)
            if not isinstance(name, (str, int, float, bool)) and name is not None:
                raise YamlInputError(f"{self.source}:{k.start_mark.line + 1}: {key or '(top level)'}: a key must be "
                                     f"text, got {name!r}")
            if name in out:
                raise YamlInputError(f"{self.source}:{k.start_mark.line + 1}: {key + '.' if key else ''}{name}: "
                                     "given twice")
            child = f"{key}.{name}" if key else str(name)
            out[name] = self.value(v, child)
            if self.lines is not None:
                self.lines[child] = k.start_mark.line + 1
        return out

    def scalar(self, node: yaml.Node, key: str) -> Any:
        where = f"{self.source}:{node.start_mark.line + 1}: {key or '(top level)'}"
        if not isinstance(node, yaml.ScalarNode):
            raise YamlInputError(f"{where}: a mapping or list cannot be a key")
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:  # !!python/name and other tags the safe loader does not run
            raise YamlInputError(f"{where}: {_problem(e)} (only plain values are read; nothing was run)") from None
        if isinstance(value, (bytes, datetime.date)):
            raise YamlInputError(f"{where}: {type(value).__name__} values are not read (got {node.value!r}): "
                                 "quote it to give text")
        return value


def safe_load(text: str, source: str) -> Any:
    """`yaml.safe_load`, checked: plain data only, aliases within budget, no cycles."""
    node = compose(text, source)
    return None if node is None else to_plain(node, source)
