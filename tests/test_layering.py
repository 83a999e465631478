"""The house's one-way dependencies, checked on the source: the library never imports the command line, and the
data layer never imports the module, the metrics or the evaluation code."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mma"
CLI = ("mma.cli", "mma.commands")
ABOVE_DATA = ("mma.module", "mma.metrics", "mma.evaluate")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, by absolute name (relative imports are not used in mma)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name != "cli.py" and "commands" not in p.parts]


def _imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported_modules(path) if any(n == p or n.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_the_library_does_not_import_the_command_line(path):
    assert not _imports_any(path, CLI)


@pytest.mark.parametrize("path", sorted((PACKAGE / "data").glob("*.py")), ids=lambda p: p.name)
def test_the_data_layer_does_not_import_module_metrics_or_evaluation(path):
    assert not _imports_any(path, ABOVE_DATA)
