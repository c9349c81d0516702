"""Each code folder is one floor and imports point down only, function-local imports included (the README's
layout section draws the floors)."""

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
# folder -> (package, floor); a higher floor may import a lower one, a folder itself, nothing else
FOLDERS = {"dynascope/core": ("dynascope.core", 0),
           "analysis": ("dynascope.analysis", 1), "dynascope/outputs": ("dynascope.outputs", 1),
           "callbacks": ("dynascope.callbacks", 2), "dynascope/pages": ("dynascope.pages", 2),
           "train": ("dynascope.train", 3),
           "dynascope": ("dynascope", 4)}
PACKAGES = {package: floor for package, floor in FOLDERS.values()}


def package_of(module: str) -> str:
    """The floor package a dynascope module belongs to (`dynascope.cli` -> `dynascope`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in PACKAGES else "dynascope"


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) of every dynascope import in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dynascope")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynascope"):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "dynascope" else [node.module]
            found += [(node.lineno, name) for name in names]
    return found


def violations(package: str, source: str) -> list[str]:
    """The imports of a module of `package` that point up a floor or across into a sibling floor."""
    floor = PACKAGES[package]
    bad = []
    for line, module in imported(source):
        target = package_of(module)
        if target != package and PACKAGES[target] >= floor:
            bad.append(f"line {line}: {package} (floor {floor}) imports {module} (floor {PACKAGES[target]})")
    return bad


def test_imports_point_down_only():
    checked, bad = 0, []
    for folder, (package, _) in FOLDERS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            bad += [f"{path.relative_to(REPO)} {v}" for v in violations(package, path.read_text())]
            checked += 1
    assert checked > 40 and bad == []


def test_the_check_catches_imports_up_and_across():
    assert violations("dynascope.core", "def f():\n    from dynascope.analysis.view import ModelView\n") == [
        "line 2: dynascope.core (floor 0) imports dynascope.analysis.view (floor 1)"]
    assert violations("dynascope.analysis", "import dynascope.outputs.files\n") == [
        "line 1: dynascope.analysis (floor 1) imports dynascope.outputs.files (floor 1)"]
    assert violations("dynascope.pages", "from dynascope import analyze\n") == [
        "line 1: dynascope.pages (floor 2) imports dynascope.analyze (floor 4)"]
    assert violations("dynascope.train", "from dynascope.core.io import read_yaml\nfrom dynascope.train import cli\n") \
        == []


def test_every_lightning_hook_we_implement_is_marked_override():
    """A method of ours that Lightning's base class defines (a hook, a logger or checkpoint-IO method) carries
    `@override`, so a renamed hook upstream is an error, not silence."""
    import inspect

    from dynascope.callbacks import dynamics, logger, resume, snapshots, throughput
    from dynascope.train import cli, datamodule, module

    unmarked, checked = [], 0
    for mod in (dynamics, logger, resume, snapshots, throughput, datamodule, module, cli):
        for cls in (c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__):
            theirs = [b for b in cls.__mro__[1:] if b.__module__.startswith(("lightning", "pytorch_lightning"))]
            for name, fn in vars(cls).items():
                fn = fn.fget if isinstance(fn, property) else fn
                if callable(fn) and any(name in vars(b) for b in theirs) and not name.startswith("__"):
                    checked += 1
                    if not getattr(fn, "__override__", False):
                        unmarked.append(f"{cls.__name__}.{name}")
    assert checked > 25 and unmarked == []
