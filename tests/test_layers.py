"""The layers read one way: runtime (numpy, no torch) <- engine (the PyTorch reference) <- export (builds graphs)
<- commands and cli <- bench (scripts that nothing below them imports). Checked on the source, every import statement
of every module, inline imports included."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"runtime": {"torch", "torchvision", "engine", "export", "commands", "bench", "cli"},
             "engine": {"export", "commands", "bench", "cli"},
             "export": {"commands", "bench", "cli"},
             "commands": {"bench", "cli"}}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package):
    offending = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert not {path: names for path, names in offending.items() if names}
