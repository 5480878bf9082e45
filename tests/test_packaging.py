"""The packaging promises: what each extra installs, what the Makefile runs, what the package imports.

* ``make demo`` installs the ``demo`` extra only: no torch (an unpinned torch is a multi-GB CUDA
  download) and no vector-quantize-pytorch (which brings torch).
* The ``test`` extra holds everything in ``demo``, so that one environment runs both.
* The installed package ``vqref/`` imports no heavy optional library at module top level
  (torch, vector-quantize-pytorch, scikit-learn, FAISS, mpi4py, JAX): ``import vqref`` needs numpy
  and array-api-compat only.  Imports inside functions are fine; the torch references in
  ``vqref/testing/torch_reference/``, the JAX references in ``vqref/testing/jax_reference/``,
  the converters in ``vqref/interop/`` and the MPI communicators in ``vqref/distributed/`` are
  exempt.
* Every ``.PHONY`` target of the Makefile has a recipe, and ``make help`` lists each of them.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqref"

TORCH_LIKE = {"torch", "vector-quantize-pytorch"}
HEAVY = {"torch", "vector_quantize_pytorch", "sklearn", "faiss", "mpi4py", "jax"}  # top-level module names
# file or folder (relative to vqref/) -> the heavy modules it may import at top level
EXEMPT = {
    "testing/torch_reference": {"torch"},
    "testing/jax_reference": {"jax"},
    "interop": {"torch", "vector_quantize_pytorch"},
    "distributed": {"mpi4py"},
}


# --------------------------------------------------------------------------------------------
# pyproject.toml: the extras
# --------------------------------------------------------------------------------------------


def _extras() -> dict[str, list[Requirement]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}


def _names(extra: str, extras: dict[str, list[Requirement]], seen: frozenset = frozenset()) -> set[str]:
    """The distributions an extra installs directly, following references to vqref's own extras."""
    names = set()
    for req in extras[extra]:
        name = canonicalize_name(req.name)
        if name == "vqref":  # e.g. "vqref[demo]" inside another extra
            for other in req.extras - seen:
                names |= _names(other, extras, seen | {extra})
        else:
            names.add(name)
    return names


def test_demo_extra_has_what_the_demo_needs_and_no_torch():
    extras = _extras()
    demo = _names("demo", extras)
    assert not demo & TORCH_LIKE, f"the demo extra must not install {sorted(demo & TORCH_LIKE)}"
    assert {"scikit-learn", "matplotlib", "tqdm"} <= demo, demo


def test_test_extra_includes_the_demo_extra():
    extras = _extras()
    by_name = lambda extra: {canonicalize_name(r.name): r.specifier for r in extras[extra]}  # noqa: E731
    demo, test = by_name("demo"), by_name("test")
    missing = sorted(set(demo) - set(test))
    assert not missing, f"the test extra lacks {missing} from the demo extra"
    differ = sorted(n for n in demo if demo[n] != test[n])
    assert not differ, f"demo and test pin {differ} differently"
    assert {"pytest", "tqdm", "ruff"} <= set(test)


# --------------------------------------------------------------------------------------------
# The Makefile
# --------------------------------------------------------------------------------------------


def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


def _phony(text: str) -> list[str]:
    return [t for line in re.findall(r"^\.PHONY\s*:(.*)$", text, flags=re.M) for t in line.split()]


def test_every_phony_target_has_a_recipe_and_a_help_line():
    text = _makefile()
    lines = text.splitlines()
    phony = _phony(text)
    assert {"help", "demo", "test", "bench", "lint"} <= set(phony), phony
    for target in phony:
        rules = [i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:(?!=)", line)]
        assert len(rules) == 1, f"target {target!r}: {len(rules)} rules"
        i = rules[0]
        inline = ";" in lines[i].split("#")[0]
        assert inline or (i + 1 < len(lines) and lines[i + 1].startswith("\t")), f"target {target!r} has no recipe"
    helped = re.findall(r"^## make ([\w-]+):", text, flags=re.M)
    assert sorted(helped) == sorted(phony), "every .PHONY target, and only those, has a `## make TARGET:` line"


def _variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*?)\s*$", text, flags=re.M))


def _expand(s: str, variables: dict[str, str]) -> str:
    for _ in range(10):  # nested references
        s = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), s)
    return s


def _recipe(text: str, target: str) -> tuple[list[str], list[str]]:
    """Prerequisites and recipe lines of ``target`` (variables expanded)."""
    variables = _variables(text)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        head, sep, rest = line.partition(":")
        if sep and not rest.startswith("=") and _expand(head.strip(), variables) == target:
            prereqs = _expand(rest.split("|")[0], variables).split()
            body = []
            for follow in lines[i + 1 :]:
                if not follow.startswith("\t"):
                    break
                body.append(_expand(follow, variables))
            return prereqs, body
    raise AssertionError(f"no rule for {target!r}")


def _installs(recipe: list[str]) -> list[str]:
    """The extras that ``pip install`` lines install from the checkout: ``-e ".[demo]"`` -> ``demo``."""
    return [extras for line in recipe if "pip install" in line for extras in re.findall(r"\.\[([\w,-]+)\]", line)]


def test_make_demo_installs_the_demo_extra_only():
    text = _makefile()
    prereqs, _ = _recipe(text, "demo")
    installs = [extra for p in prereqs if p != "pyproject.toml" for extra in _installs(_recipe(text, p)[1])]
    assert installs == ["demo"], f"make demo installs extras {installs}"
    prereqs, _ = _recipe(text, "test")
    installs = [extra for p in prereqs if p != "pyproject.toml" for extra in _installs(_recipe(text, p)[1])]
    assert installs == ["test"], f"make test installs extras {installs}"


def _make_n(cwd: Path, target: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "PY", "ARGS")}
    proc = subprocess.run(
        ["make", "-n", target], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_then_make_test_on_a_fresh_clone(tmp_path):
    """What make would run (``make -n``): demo on a fresh clone creates the environment and
    installs .[demo], no torch; test after it still installs .[test]; demo again installs nothing."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    out = _make_n(tmp_path, "demo")
    assert "-m venv" in out and '".[demo]"' in out and ".[test" not in out and "torch" not in out, out
    assert "-m vqref demo" in out

    # as if `make demo` had run: the environment exists and the demo stamp is newer than pyproject.toml
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    now = time.time()
    for path, age in ((venv / "bin" / "python", 100), (tmp_path / "pyproject.toml", 100), (venv / ".vqref-demo", 50)):
        path.touch()
        os.utime(path, (now - age, now - age))
    out = _make_n(tmp_path, "test")
    assert '".[test]"' in out and "-m venv" not in out, out
    out = _make_n(tmp_path, "demo")
    assert "pip install" not in out and "-m vqref demo" in out, out


# --------------------------------------------------------------------------------------------
# The package: no heavy import at module top level
# --------------------------------------------------------------------------------------------


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Top-level module names imported when the module is imported: the module body and class
    bodies, through ``if``/``try``/``with`` blocks, but not function bodies nor
    ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    children = getattr(node, field, None) or []
                    visit([c for c in children if isinstance(c, ast.stmt)])
                    for handler in children:
                        if isinstance(handler, ast.ExceptHandler):
                            visit(handler.body)

    visit(tree.body)
    return found


def test_the_checker_sees_top_level_imports_only():
    src = (
        "import torch.nn\nfrom sklearn import cluster\ntry:\n    import faiss\nexcept ImportError:\n    import numpy\n"
        "class A:\n    import vector_quantize_pytorch\n"
        "def f():\n    import scipy\nif TYPE_CHECKING:\n    import pandas\nfrom . import modules\n"
    )
    assert _top_level_imports(ast.parse(src)) == {"torch", "sklearn", "faiss", "numpy", "vector_quantize_pytorch"}


def test_the_package_imports_no_heavy_library_at_top_level():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    offenders = []
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        allowed = set().union(
            *(mods for prefix, mods in EXEMPT.items() if rel == prefix or rel.startswith(prefix + "/"))
        )
        heavy = (_top_level_imports(ast.parse(path.read_text(), filename=str(path))) & HEAVY) - allowed
        if heavy:
            offenders.append(f"vqref/{rel}: {sorted(heavy)}")
    assert not offenders, "import these inside the functions that need them:\n" + "\n".join(offenders)


def test_the_benchmarks_are_not_in_the_package():
    assert not (PACKAGE / "bench.py").exists()
    assert (ROOT / "benchmarks" / "bench.py").is_file()
