"""The product does not import the developer tools, the simulator or the command line.

``controller`` is what a clinic runs. The simulated pen, the demo, the
benchmarks and the scripted therapist drive it from outside (``devtools``,
``simulated_pen``), and ``penctl`` sits above both. An import the other way
would put a demo clinic or a benchmark rig in the product's import graph, so
this reads every module's syntax tree (import statements anywhere, including
inside functions, and ``importlib.import_module("...")`` with a literal name)
rather than trusting a text search.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("simulated_pen", "devtools", "penctl")


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file under ``root``."""
    package = path.relative_to(root).parent.parts
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package[: len(package) - node.level + 1]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.lineno, node.module or ""
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def forbidden_imports(package: str, root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in sorted(imported_modules(path, root)):
            if module.split(".")[0] in FORBIDDEN:
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_the_product_imports_no_developer_tool() -> None:
    assert forbidden_imports("controller") == []


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    package = tmp_path / "controller" / "api"
    package.mkdir(parents=True)
    (package / "bad.py").write_text(
        "import importlib\n"
        "import simulated_pen.runner\n"
        "from devtools import therapist\n"
        "from . import models\n"
        "from ..sessions import Role\n"
        "def later() -> None:\n"
        "    from penctl.cli import main\n"
        "    importlib.import_module('devtools.bench.cli')\n"
    )
    assert forbidden_imports("controller", tmp_path) == [
        "controller/api/bad.py:2 imports simulated_pen.runner",
        "controller/api/bad.py:3 imports devtools",
        "controller/api/bad.py:7 imports penctl.cli",
        "controller/api/bad.py:8 imports devtools.bench.cli",
    ]
    relative = [m for _, m in imported_modules(package / "bad.py", tmp_path)]
    assert {"controller.api", "controller.sessions"} <= set(relative)
