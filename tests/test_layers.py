"""The package's layers (its docstring): no module imports from a layer above its own."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# top (1) to bottom (7), as laplacedrl/__init__.py describes them; the first matching prefix wins
LAYERS = [
    (1, ("train_ssl", "pretrain_drl", "laplacedrl.train_ssl", "laplacedrl.pretrain_drl", "laplacedrl.evaluate",
         "laplacedrl.demo_images",
         "laplacedrl.sample", "laplacedrl.probe", "laplacedrl.reproduce", "laplacedrl.paper_results",
         "benchmarks")),
    (2, ("laplacedrl.recipes",)),
    (3, ("laplacedrl.ssl", "laplacedrl.drl", "laplacedrl.data")),
    (4, ("laplacedrl.engine",)),
    (5, ("laplacedrl.models",)),
    (6, ("laplacedrl.diffusion", "laplacedrl.graph")),
    (7, ("laplacedrl.config", "laplacedrl.choices", "laplacedrl.errors", "laplacedrl")),
]


def layer(module: str):
    for number, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """Every laplacedrl module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}    # from pkg import module
    return {m for m in found if m.split(".")[0] == "laplacedrl"}


SOURCES = sorted([*(ROOT / "laplacedrl").rglob("*.py"), ROOT / "train_ssl.py", ROOT / "pretrain_drl.py",
                  *(ROOT / "benchmarks").glob("*.py")])


def known(module: str) -> bool:
    """Whether ``module`` names a module or package of this repository (not a name inside one)."""
    path = ROOT / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    mine = layer(module_name(path))
    assert mine is not None, f"{path} belongs to no layer: add it to the package docstring and LAYERS"
    up = [m for m in imports(path) if known(m) and layer(m) < mine]
    assert not up, f"{module_name(path)} (layer {mine}) imports from a higher layer: {up}"


def test_the_layers_are_the_documented_ones():
    import laplacedrl
    doc = laplacedrl.__doc__
    for name in ("tools", "recipes", "parts", "engine", "models", "math", "base"):
        assert name in doc
    assert all(layer(module_name(p)) is not None for p in SOURCES)
