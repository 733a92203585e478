"""The package's layers: its docstring names every module and package once, from the top down, and
each imports only from those named after it. A module the list misses, a name the list has that is
not there, and a module listed above one it is imported by (e.g. data/ beside ssl/) all fail."""
import ast
import re
from pathlib import Path

import pytest

import laplacedrl

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "laplacedrl").rglob("*.py"), ROOT / "train_ssl.py", ROOT / "pretrain_drl.py",
                  *(ROOT / "benchmarks").glob("*.py")])
SOURCES.remove(ROOT / "laplacedrl" / "__init__.py")      # the list itself (it imports nothing)


def documented_order(doc: str) -> list:
    """The ``names`` of the docstring's numbered list, in order: ``train_ssl.py`` -> ``train_ssl``,
    ``benchmarks/`` -> ``benchmarks``, ``laplacedrl.ssl`` as it is."""
    listed = doc[doc.index("\n1. "):]
    return [re.sub(r"(\.py|/)$", "", name) for name in re.findall(r"``([\w./]+)``", listed)]


ORDER = documented_order(laplacedrl.__doc__)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str, order=ORDER):
    """The listed name ``module`` belongs to (the longest listed prefix), or None."""
    owners = [u for u in order if module == u or module.startswith(u + ".")]
    return max(owners, key=len, default=None)


def problems(path: Path, order=ORDER) -> list:
    """What is wrong with ``path``'s imports under the list ``order``: an import of a name listed
    above (or beside) its own, or a module the list misses."""
    mine = unit(module_name(path), order)
    if mine is None:
        return [f"{path} belongs to no name of laplacedrl's docstring: add it to the list"]
    found = []
    for imported in sorted(imports(path)):
        theirs = unit(imported, order)
        if theirs is None:
            found.append(f"{imported} belongs to no name of laplacedrl's docstring")
        elif theirs != mine and order.index(theirs) < order.index(mine):
            found.append(f"{module_name(path)} imports {imported}, but the docstring lists {theirs} above {mine}")
    return found


def imports(path: Path) -> set:
    """Every module of this repository ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}    # from pkg import module
    return {m for m in found if known(m) and m != "laplacedrl"}


def known(module: str) -> bool:
    """Whether ``module`` names a module or package of this repository (not a name inside one)."""
    path = ROOT / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_documented_list(path):
    assert not problems(path)


def test_the_list_names_each_module_once_and_only_modules_there_are():
    assert len(ORDER) == len(set(ORDER)), [u for u in ORDER if ORDER.count(u) > 1]
    missing = [u for u in ORDER if not (known(u) or (ROOT / u).is_dir())]
    assert not missing, f"the docstring lists {missing}, which do not exist"


def test_a_wrong_list_fails():
    """data/ listed beside (before) ssl/, or the engine above the data: the imports say otherwise."""
    for moved, above in (("laplacedrl.data", "laplacedrl.ssl"), ("laplacedrl.engine", "laplacedrl.data")):
        wrong = ORDER.copy()
        wrong.remove(moved)
        wrong.insert(wrong.index(above), moved)
        assert any(problems(path, wrong) for path in SOURCES), moved
    assert problems(ROOT / "laplacedrl" / "config.py", [u for u in ORDER if u != "laplacedrl.registry"])
