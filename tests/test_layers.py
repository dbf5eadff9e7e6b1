"""The layers read one way: runtime (numpy, no torch) <- engine (the PyTorch reference) <- export (builds graphs)
<- commands and cli <- bench (scripts that nothing below them imports); inside engine, its rooms read one way too.
Checked on the source, every import statement of every module, inline imports included."""
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


# engine/ in rooms: the data and the networks stand below the method (engine's own files, tasks/, backends/);
# training and measuring stand on the method, and not on each other
ROOM_MAY_IMPORT = {"data": {"data"}, "models": {"data", "models"}, "method": {"data", "models", "method"},
                   "train": {"data", "models", "method", "train"}, "eval": {"data", "models", "method", "eval"}}


def room(module: str) -> str:
    """The room of an engine module (dotted name)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOM_MAY_IMPORT else "method"


def engine_imports(source: str, module: str) -> set[str]:
    """The engine modules that ``module``'s ``source`` imports (relative imports resolved; ``from . import x``
    counted as x)."""
    package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "engine")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] == "engine":
                found.update([f"{base}.{a.name}" for a in node.names] if node.module is None else [base])
    return found


def across_rooms(source: str, module: str) -> list[str]:
    allowed = ROOM_MAY_IMPORT[room(module)]
    return sorted(m for m in engine_imports(source, module) if m != "engine" and room(m) not in allowed)


def test_engine_rooms_import_only_the_rooms_below_them():
    offending = {}
    for path in sorted((ROOT / "engine").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if path.name == "__init__.py":
            module += ".__init__"          # a package's face sits inside its room
        wrong = across_rooms(path.read_text(), module)
        if wrong:
            offending[str(path.relative_to(ROOT))] = wrong
    assert not offending


def test_the_room_rule_sees_an_import_across_rooms():
    # the rule above passes only if it can fail: imports from a model file into training, and from training into
    # measuring, are caught in each spelling; the rooms below are allowed
    source = "from ..train.loop import log\nfrom engine.eval import evaluate\nfrom ..data import cifar10\n"
    assert across_rooms(source, "engine.models.weights") == ["engine.eval", "engine.train.loop"]
    assert across_rooms("from ..eval.attack_set import x\nfrom .loop import y\n", "engine.train.joint") == \
        ["engine.eval.attack_set"]
    assert across_rooms("from .repair import r\nfrom .models.heads import h\n", "engine.pipeline") == []


def test_the_layout_in_design_md_is_the_one_in_the_tree():
    """docs/design.md's layout names every module of the code, and every path its "where does X live" table gives
    exists: a file moved or added without its line there fails here."""
    import re

    text = (ROOT / "docs" / "design.md").read_text()
    layout = text[text.index("## Layout"):text.index("### Where does X live")]
    table = text[text.index("### Where does X live"):]
    unnamed = [str(p.relative_to(ROOT)) for package in ("engine", "runtime", "export", "commands", "bench")
               for p in sorted((ROOT / package).rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and not re.search(rf"\b{p.stem}(\.py)?\b", layout)]
    assert not unnamed
    paths = re.findall(r"`((?:engine|runtime|export|commands|bench)/[\w/]*(?:\.py)?)`", table)
    assert paths and not [p for p in paths if not (ROOT / p).exists()]
