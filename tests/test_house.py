"""The house rules, checked on the source: one-way imports between packages, no import cycles, short functions.

Imports inside functions count too: a cycle hidden in a function is still a cycle. The package order is
the pipeline's: a package may import only from packages before it in LAYERS (and from itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdsweep"
# Lowest first. tracking sits below training because teachers and trials log to MLflow while they train.
LAYERS = ["common", "data", "models", "methods", "tracking", "training", "study", "report", "tools", "api", "cli"]
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kdsweep modules `name` imports anywhere in its body (a package's __init__ counts as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_go_one_way_down_the_pipeline():
    wrong = []
    for module, targets in _graph().items():
        if module == "kdsweep":
            continue
        if _layer(module) not in LAYERS:
            wrong.append(f"{module}: not in a package of LAYERS")
            continue
        for target in targets:
            if _layer(target) and LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
                wrong.append(f"{module} imports {target}, a later package")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {m: {t for t in ts if t != "kdsweep"} for m, ts in _graph().items()}
    done: set[str] = set()
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in stack:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in done:
                visit(target, stack + [target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def test_every_package_and_module_says_what_it_holds():
    """Method files are the exception: each declares itself in its class's `summary` and `reference`."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "methods" and path.name not in ("__init__.py", "base.py", "space.py"):
            continue
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
        if not doc or doc.startswith("TODO"):
            missing.append(str(path.relative_to(PACKAGE.parent)))
    assert not missing, missing


def test_the_checks_find_what_they_look_for(tmp_path, monkeypatch):
    """The rules above are not vacuous: a planted cycle, an upward import and a long function are all caught."""
    import pytest

    pkg = tmp_path / "kdsweep"
    for sub in ("common", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text('"""x."""\n')
    (pkg / "__init__.py").write_text('"""x."""\n')
    (pkg / "common" / "a.py").write_text('"""x."""\ndef f():\n    from kdsweep.data import b\n')
    (pkg / "data" / "b.py").write_text('"""x."""\nfrom kdsweep.common import a\n\n\ndef g():\n' + "    x = 1\n" * 61)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    for check in (test_imports_go_one_way_down_the_pipeline, test_no_import_cycles,
                  test_no_function_is_longer_than_sixty_lines):
        with pytest.raises(AssertionError):
            check()


METHOD_MODULES = sorted(p.stem for p in (PACKAGE / "methods").glob("*.py") if p.stem != "__init__")


def test_each_method_module_imports_first():
    """`import kdsweep.methods.crd` in a fresh process once failed: the registry, importing every method while
    crd was half made, reached crd_seed003, which imports crd. Each module is imported first here, in this
    process, with the package's modules removed from sys.modules (and put back after): torch stays imported."""
    import importlib
    import sys

    import kdsweep
    import kdsweep.methods.registry  # noqa: F401 - what the test puts back afterwards

    saved = {k: v for k, v in sys.modules.items() if k == "kdsweep.methods" or k.startswith("kdsweep.methods.")}
    expected = len(saved["kdsweep.methods.registry"].METHODS)
    try:
        for name in METHOD_MODULES:
            for k in [k for k in sys.modules if k == "kdsweep.methods" or k.startswith("kdsweep.methods.")]:
                del sys.modules[k]
            importlib.import_module(f"kdsweep.methods.{name}")
            assert len(sys.modules["kdsweep.methods.registry"].METHODS) == expected, name
    finally:
        for k in [k for k in sys.modules if k == "kdsweep.methods" or k.startswith("kdsweep.methods.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        kdsweep.methods = saved["kdsweep.methods"]
