"""The package's imports run one way: no circle, and no module imports from a later stage.

The stages, from the bottom: `env_flags`, `embedded` (the shipped task and assets), `data`, `model`,
`inference`, `training`, then the programs at the package top (`python -m llada_trm.<name>`, with `cli.py`
and the public `llada_trm/__init__.py`). A module may import its own stage and the stages below it. Every
import statement counts, inside functions and under `TYPE_CHECKING` too: a late import is still an arrow.
docs/architecture.md ("Stages") draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llada_trm"
STAGES = ("env_flags", "embedded", "data", "model", "inference", "training", "programs")

# DESIGN.md's `model.generate(...)` and `model.generate_with_refinement(...)`: the hybrid's two generation
# methods hand over to the decoders, which live a stage up. These are the only arrows allowed to point up.
UPWARD_BY_DESIGN = {
    ("llada_trm.model.hybrid", "llada_trm.inference.chunk_decoding"),
    ("llada_trm.model.hybrid", "llada_trm.inference.sampler"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """The package modules `path` imports (`from x import submodule` names the submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if is_module(f"{target}.{alias.name}") else target)
    return {m for m in found if m == "llada_trm" or m.startswith("llada_trm.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str:
    """The stage of a module: its first package below `llada_trm`, or `programs` for the package top."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES):
        return parts[1]
    return "programs"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as the modules in it."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} ({stage(source)}) imports {target} ({stage(target)})"
                  for source, targets in graph.items() for target in targets
                  if STAGES.index(stage(target)) > STAGES.index(stage(source))
                  and (source, target) not in UPWARD_BY_DESIGN)


def test_the_walk_sees_the_package():
    """Guards the checks below: the walk finds the stages, the programs and the known arrows."""
    graph = import_graph()
    assert {stage(m) for m in graph} == set(STAGES)
    assert stage("llada_trm.train") == stage("llada_trm.cli") == stage("llada_trm") == "programs"
    assert "llada_trm.model.hybrid" in graph["llada_trm.training.trainer"]
    assert "llada_trm.training.grad_trace" in graph["llada_trm.training.trainer"]
    assert UPWARD_BY_DESIGN <= {(s, t) for s, targets in graph.items() for t in targets}, "a stale allowance"


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_import_from_a_later_stage():
    assert upward_imports(import_graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_arrow():
    graph = import_graph()
    graph["llada_trm.data.layout"] = graph["llada_trm.data.layout"] | {"llada_trm.training.trainer"}
    assert any("llada_trm.data.layout" in group and "llada_trm.training.trainer" in group for group in circles(graph))
    assert "llada_trm.data.layout (data) imports llada_trm.training.trainer (training)" in upward_imports(graph)


PROGRAMS = [p for p in sorted(PACKAGE.glob("*.py")) if p.name not in ("__init__.py", "cli.py", "env_flags.py")]


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_each_program_lives_at_the_package_top_and_forwards_nowhere(path):
    """`python -m llada_trm.<name>` runs the module that defines the program: its own `main`, not one imported."""
    tree = ast.parse(path.read_text())
    assert "main" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, path.name
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert "main" not in imported, f"{path.name} forwards to another module's main"


def test_the_programs_are_the_documented_ones():
    assert {p.stem for p in PROGRAMS} == {"ablate", "compare", "distill", "evaluate", "frontier", "generate",
                                          "grad_trace", "inspect", "lm_eval", "merge_adapters", "pretrain", "synthetic",
                                          "train"}


def test_test_modules_import_shared_helpers_from_support_not_from_each_other():
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name} imports {name}" for name in names if name.startswith("test_")]
    assert not offenders, "; ".join(offenders) + " (shared helpers belong in tests/support.py)"
