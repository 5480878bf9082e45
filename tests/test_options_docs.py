"""docs/deviations.md §14 and docs/math.md §11: every test they name exists, every file they name too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    nxt = re.search(r"^## ", text[start + len(heading) :], flags=re.M)
    return text[start : start + len(heading) + (nxt.start() if nxt else len(text))]


def _tests_in(path: Path) -> set:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_pinning_test_of_section_14_exists():
    section = _section(ROOT / "docs" / "deviations.md", "## 14. Real-world configurations")
    named = re.findall(r"`((?:tests/)?[\w/]*?(?:test_\w+)\.py)::(test_\w+)`", section)
    assert len(named) > 20
    missing = []
    for file, test in named:
        path = ROOT / file if file.startswith("tests/") else ROOT / "tests" / "conformance" / file
        if not path.exists() or test not in _tests_in(path):
            missing.append(f"{file}::{test}")
    assert not missing, missing


def test_the_code_files_math_section_11_names_exist():
    section = _section(ROOT / "docs" / "math.md", "## 11. Real-world configurations")
    files = set(re.findall(r"`((?:vqref|tests)/[\w/]+\.py)", section))
    assert files and all((ROOT / f).exists() for f in files), sorted(f for f in files if not (ROOT / f).exists())
