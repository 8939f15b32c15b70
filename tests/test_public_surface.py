"""What the README and docs/ promise exists: every `python -m llada_trm.X` command starts (`--help` exits 0),
every `from llada_trm... import ...` line in them imports, every public name is there, and every module the
README's tour names is a file."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest

import llada_trm

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {path.name: path.read_text() for path in DOCUMENTS}


def documented_commands() -> list[str]:
    found = set()
    for text in TEXT.values():
        found |= set(re.findall(r"python -m (llada_trm(?:\.\w+)+)", text))
    return sorted(found)


def documented_imports() -> list[str]:
    """`from llada_trm[.x] import a, b` lines of the documents (one logical line, parentheses joined)."""
    found = set()
    for text in TEXT.values():
        for module, names in re.findall(r"^\s*from (llada_trm(?:\.\w+)*) import \(?([\w, \n]+?)\)?\s*$", text, re.M):
            found.add(f"from {module} import {', '.join(n.strip() for n in names.split(',') if n.strip())}")
    return sorted(found)


def test_the_documents_name_commands_and_imports():
    """Guards the scans below: if the patterns stop matching, the other tests would pass on nothing."""
    assert {"llada_trm.generate", "llada_trm.evaluate", "llada_trm.inspect", "llada_trm.compare",
            "llada_trm.ablate", "llada_trm.pretrain", "llada_trm.synthetic", "llada_trm.grad_trace"} <= set(
        documented_commands())
    assert any(line.startswith("from llada_trm import") for line in documented_imports())


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_starts(command, monkeypatch):
    """`python -m <command> --help` prints its usage and exits 0, through the module's `__main__` code."""
    monkeypatch.setattr(sys, "argv", [command, "--help"])
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported by another test
        runpy.run_module(command, run_name="__main__", alter_sys=True)
    assert stop.value.code in (0, None)
    assert "usage" in out.getvalue().lower()


@pytest.mark.parametrize("statement", documented_imports())
def test_documented_import_works(statement):
    namespace: dict = {}
    exec(statement, namespace)  # noqa: S102 - the statement is an import line taken from the docs
    names = statement.split(" import ", 1)[1].split(", ")
    assert all(namespace.get(name) is not None for name in names)


def test_every_public_name_is_exported():
    assert llada_trm.__all__, "llada_trm.__all__ is empty"
    missing = [name for name in llada_trm.__all__ if not hasattr(llada_trm, name)]
    assert missing == []


def test_every_stage_package_says_what_it_does_and_hands_on():
    for stage in ("model", "data", "training", "inference", "embedded", "cli"):
        module = importlib.import_module(f"llada_trm.{stage}")
        assert module.__doc__ and len(module.__doc__.split()) > 20, f"llada_trm.{stage} has no docstring"


def test_the_readme_tour_lists_every_module():
    """Each module of the package appears in the README's tour, and each file the tour names exists."""
    tour = TEXT["README.md"].split("## A short tour", 1)[1].split("```", 2)[1]
    package = ROOT / "llada_trm"
    modules = [p for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    unlisted = sorted(str(p.relative_to(package)) for p in modules if not re.search(rf"\b{p.stem}\b", tour))
    assert unlisted == [], f"README tour does not list {unlisted}"
    named = re.findall(r"\b(\w+)\.py\b", tour)
    existing = {p.stem for p in ROOT.rglob("*.py")}
    assert sorted(set(named) - existing) == []
