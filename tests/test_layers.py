"""The package's import graph goes one way: each part imports only from parts below it.

Read bottom to top, the layers are what a newcomer can learn in order; a new module takes
its place here, and an upward import (the sign of code in the wrong place) fails this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jaxmerge

LAYERS = [
    ("jaxmerge.errors", "jaxmerge.yaml_input", "jaxmerge.console", "jaxmerge.hub"),
    ("jaxmerge.models",),
    ("jaxmerge.architectures",),
    ("jaxmerge.parallel",),
    ("jaxmerge.checkpoint",),
    ("jaxmerge.outputs", "jaxmerge.saving", "jaxmerge.generation", "jaxmerge.images"),
    ("jaxmerge.merge",),
    ("jaxmerge.eval",),
    ("jaxmerge.harness",),
    ("jaxmerge.search",),
    ("jaxmerge.plan",),  # memory per device: `jaxmerge plan`, and a dry run's estimate
    ("jaxmerge.pipeline", "jaxmerge.testing"),
    ("jaxmerge.cli", "jaxmerge.experiments"),
]
ROOT = Path(jaxmerge.__file__).parent


def part(module: str) -> str | None:
    """The layer entry a module belongs to (a package, or a top-level module)."""
    for layer in LAYERS:
        for name in layer:
            if module == name or module.startswith(name + "."):
                return name
    return None


def level(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part(module) in layer)


def imports(path: Path) -> set[str]:
    """Every jaxmerge module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxmerge"):
            found |= {f"{node.module}.{a.name}" if node.module == "jaxmerge" else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jaxmerge")}
    return found


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        assert module == "jaxmerge" or part(module) is not None, f"{module}: add it to LAYERS"


def test_no_module_imports_upward_or_the_top_level_package():
    upward = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "jaxmerge":
            continue
        for imported in imports(path):
            if imported == "jaxmerge" or part(imported) is None:
                upward.append(f"{module} imports {imported} (the top-level package)")
            elif level(imported) > level(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_library_logs_and_only_the_command_line_prints():
    """A program embedding jaxmerge controls its output through `logging`."""
    printing = []
    for path in ROOT.rglob("*.py"):
        calls = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        if calls and path.name != "cli.py":
            printing.append(f"{path.relative_to(ROOT)}:{calls[0].lineno}")
    assert not printing, printing
