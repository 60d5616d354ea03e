"""docs/HAZARDS.md names the tests that prove each control: every one must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`((?:reliability/)?test_\w+\.py)::(\w+)(?:\[[^\]]*\])?`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_test_the_hazard_table_names_exists() -> None:
    text = (ROOT / "docs" / "HAZARDS.md").read_text()
    references = REFERENCE.findall(text)
    assert len(references) >= 25
    missing = []
    for file, name in references:
        path = ROOT / "tests" / file
        if not path.exists() or name not in _test_names(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"HAZARDS.md names tests that do not exist: {missing}"


def test_every_item_of_issue_11_is_a_row() -> None:
    text = (ROOT / "docs" / "HAZARDS.md").read_text()
    assert {f"**11.{n}**" for n in range(1, 9)} <= set(re.findall(r"\*\*11\.\d\*\*", text))
