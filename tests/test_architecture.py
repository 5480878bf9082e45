"""The house rules of docs/architecture.md, checked on the source tree.

Each check reads files only (no import of the package under test), so it also guards code that
no other test executes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import vqref
from vqref import ResidualVQ, VectorQuantize
from vqref.core.quantize import quantize_forward

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqref"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# NamedTuple's public API starts with an underscore; vector-quantize-pytorch's codebook module is
# its attribute ``_codebook`` (read by the converters, never vqref's own private state).
ALLOWED_PRIVATE = {"_replace", "_asdict", "_fields", "_make", "_codebook"}


def test_no_module_is_longer_than_a_sitting():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 520}
    assert not long, f"modules over ~500 lines: {long}"


def _private_accesses(path: Path, root: Path = ROOT) -> list[str]:
    """``obj._name`` where obj is not ``self``/``cls``: another object's private member."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr in ALLOWED_PRIVATE:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            found.append(f"{path.relative_to(root)}:{node.lineno}: .{node.attr}")
    return found


def test_no_private_access_across_objects():
    found = [hit for p in SOURCES for hit in _private_accesses(p)]
    assert not found, "private members of other objects used:\n" + "\n".join(found)


def test_the_private_access_check_can_fail(tmp_path):
    # negative control: the scanner reports a private member read through another object
    bad = tmp_path / "bad.py"
    bad.write_text("def f(module):\n    return module._state, module._replace\n")
    assert _private_accesses(bad, tmp_path) == ["bad.py:2: ._state"]


def _text_files():
    for pattern in ("vqref/**/*.py", "tests/**/*.py", "docs/*.md", "README.md", "notebooks/*.ipynb", "benchmarks/*"):
        yield from (p for p in ROOT.glob(pattern) if p.is_file())


def test_no_reference_to_files_outside_the_repository():
    # the developers' folder beside the checkout and the math notes kept there: spelled in
    # pieces, so that this test is not itself a reference to them
    folder, notes = "sha" + "red", "MA" + "TH.md"
    outside = re.compile(
        "|".join(re.escape(s) for s in (notes, "../" + folder, f"{folder}/reference", f"{folder}/seed"))
    )
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _text_files()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, f"references to files outside the repository: {hits}"


def test_markdown_links_point_at_files_that_exist():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in link.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, f"broken links: {missing}"


def test_isinstance_tells_the_truth_for_every_constructor():
    vq = VectorQuantize(4, 8)
    stack = VectorQuantize(4, 8, num_quantizers=3)
    rq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8)
    assert type(vq) is VectorQuantize and not vq.is_stack
    assert type(stack) is VectorQuantize and stack.is_stack and not isinstance(stack, ResidualVQ)
    assert type(rq) is ResidualVQ and isinstance(rq, VectorQuantize) and rq.is_stack


def test_the_public_api():
    for name in ("VectorQuantize", "ResidualVQ", "VQClustering", "ResidualClustering", "kmeans"):
        assert name in vqref.__all__ and hasattr(vqref, name), name
    res = vqref.kmeans(np.random.default_rng(0).standard_normal((30, 3)), 4, 3, rng=0, use_cosine_sim=False)
    assert res.means.shape == (4, 3)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_quantize_losses_are_zero_dimensional_arrays(weight):
    # one convention on every backend: numpy's scalars are not arrays of the namespace
    rng = np.random.default_rng(0)
    out, _ = quantize_forward(rng.standard_normal((7, 3)), rng.standard_normal((5, 3)), orthogonal_reg_weight=weight)
    for value in (out.loss, out.commitment) + ((out.orthogonal,) if weight else ()):
        assert isinstance(value, np.ndarray) and value.shape == (), type(value)
