"""The package's shape: layers import downwards only, no hidden cycles, small functions."""

import ast
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lesskv"
MAX_FUNCTION_LINES = 80


def sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in sorted(PACKAGE.rglob("*.py"))]


def test_layers_import_downwards_only():
    """Contracts in pyproject.toml: core <- hf <- training/evaluation <- analysis <- cli."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_function_level_lesskv_import_outside_the_cli():
    """A function-level import is how a cycle hides; only the CLI defers imports (for a fast
    ``--help``)."""
    found = []
    for path, tree in sources():
        if path.parent.name == "cli":
            continue
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if (module or "").startswith("lesskv") or any(
                    n.startswith("lesskv") for n in names
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found


def test_functions_stay_short():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for path, tree in sources()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long


def test_nothing_loads_pickles_or_runs_remote_code():
    """Checkpoints and models are data: no unpickling, no code from a model repository."""
    import re
    from pathlib import Path

    for path in Path(__file__).resolve().parents[1].joinpath("src").rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*import pickle|^\s*from pickle", text, re.M), path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
