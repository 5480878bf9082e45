"""Every notebook runs from a fresh kernel without an error, and its committed outputs are what it
prints today.

Each notebook is executed once (nbclient, ``MPLBACKEND=Agg``, one BLAS thread) and its text
outputs are compared cell by cell with the committed ones; ``tests/refresh_notebooks.py`` says
what is compared and how, and rewrites the outputs after a deliberate change
(``make notebooks-refresh``). With ``VQREF_NOTEBOOKS_EXECUTE_ONLY=1`` the notebooks are executed
but their outputs are not compared (for a machine whose CPU rounds float32 products differently
from the one that wrote them).

The other tests of this file check the comparison itself, without a kernel: each rule has a
case where it must report a difference.
"""

from __future__ import annotations

import os

import nbformat
import pytest
from refresh_notebooks import differences, execute, normalise, notebooks, same_text, text_outputs

NOTEBOOKS = notebooks()


def test_the_notebooks_are_found():
    names = [p.name for p in NOTEBOOKS]
    assert len(names) >= 10 and names[0].startswith("01_") and names == sorted(names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_matches_its_committed_outputs(path):
    committed = nbformat.read(path, as_version=4)
    fresh = execute(path)  # raises CellExecutionError (with the cell and traceback) on an error
    if os.environ.get("VQREF_NOTEBOOKS_EXECUTE_ONLY") == "1":
        return
    found = differences(committed, fresh)
    assert not found, (
        f"{path.name}: the committed outputs differ from a fresh run "
        f"(after a deliberate change: python -m tests.refresh_notebooks {path.relative_to(path.parents[1])})\n"
        + "\n".join(found)
    )


# -- the comparison, without a kernel ------------------------------------------------------------


def _notebook(*cells):
    """A notebook of code cells, each given as (source, [outputs])."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, outputs=outs) for src, outs in cells]
    return nb


def _stdout(text):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def _figure(size="640x480", image=True):
    data = {"text/plain": f"<Figure size {size} with 1 Axes>"}
    if image:
        data["image/png"] = "iVBORw0KGgo="
    return nbformat.v4.new_output("display_data", data=data)


def test_normalise_removes_addresses_timings_progress_bars_and_trailing_space():
    text = "obj at 0x7f3a12bc90d0  \n880 steps in 2.1 s\nran in 12 ms\n 10%|#  \r100%|#####|\n\n"
    assert normalise(text) == "obj at 0x?\n880 steps in ? s\nran in ? s\n100%|#####|"


def test_normalise_keeps_every_other_number():
    # negative control: a number that is not a timing survives ("2.1 s" alone is not "in 2.1 s")
    assert normalise("loss 0.0176, took 2.1 s, 30 steps") == "loss 0.0176, took 2.1 s, 30 steps"


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("max |d| = 1.7871271227574847e-16", "max |d| = 1.7871271227574842e-16"),  # round-off
        ("rel_error(dz) = 0.0", "rel_error(dz) = 3.1e-17"),  # zero against round-off
        ("errors ['4.7e-08', '4.9e-10']", "errors ['4.5e-08', '5.3e-10']"),  # error sizes
        ("relative error 1.1e-09", "relative error 9.7e-10"),  # across a decade, within 10x
    ],
)
def test_same_text_accepts_differences_in_rounding(committed, fresh):
    assert same_text(committed, fresh)


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("held-out MSE 0.0176", "held-out MSE 0.0172"),  # a plain number: exact
        ("perplexity 107.8 of 128 codes", "perplexity 107.8 of 127 codes"),
        ("relative error 1.1e-09", "relative error 2.0e-01"),  # a broken gradient
        ("relative error 1.1e-09", "relative error 1.2e-08"),  # just over 10x
        ("max |d| = 1.7e-16", "max |d| = 1.0e-11"),  # out of round-off
        ("fraction 0.0", "fraction 0.1"),  # a plain number near zero
        ("max |d| = 4.076491995058092", "max |d| = 4.076491995058091"),  # full precision: exact
        ("codes [[7 6 7]]", "codes [[7 6 7 4]]"),  # one number more
        ("passed: True", "passed: False"),  # the words
        ("x 1e-3", "x 1e-13"),  # one small, one not
        ("decay 0.8", "decay -0.8"),  # the sign belongs to the number
    ],
)
def test_same_text_reports_real_differences(committed, fresh):
    assert not same_text(committed, fresh)


def test_a_digit_inside_a_name_is_text_not_a_number():
    assert not same_text("encoder.0.W r_0", "encoder.1.W r_0")
    assert not same_text("(64, 8) float32", "(64, 8) float64")


def test_text_outputs_joins_streams_and_counts_images():
    cell = nbformat.v4.new_code_cell(
        "",
        outputs=[
            _stdout("a = 1\n"),
            _figure(),
            _stdout("b = 2\n"),
            nbformat.v4.new_output("stream", name="stderr", text="w\n"),
        ],
    )
    assert text_outputs(cell) == {
        "stdout": "a = 1\nb = 2",
        "stderr": "w",
        "text/plain": ["<Figure size 640x480 with 1 Axes>"],
        "images": 1,
    }


def test_differences_is_empty_for_the_same_outputs_split_differently():
    committed = _notebook(("print(1); print(2)", [_stdout("1\n"), _stdout("2\n"), _figure()]))
    fresh = _notebook(("print(1); print(2)", [_stdout("1\n2\n"), _figure()]))
    assert differences(committed, fresh) == []


@pytest.mark.parametrize(
    "fresh_outputs, what",
    [
        ([_stdout("1\n3\n"), _figure()], ["stdout"]),  # a printed number changed
        ([_stdout("1\n2\n"), _figure(image=False)], ["images"]),  # the figure no longer shows
        ([_stdout("1\n2\n")], ["text/plain", "images"]),  # no display at all
        ([_stdout("1\n2\n"), _figure(size="800x480")], ["text/plain"]),  # another figure size
        (
            [_stdout("1\n2\n"), _figure(), nbformat.v4.new_output("stream", name="stderr", text="Warning\n")],
            ["stderr"],
        ),
    ],
)
def test_differences_reports_each_kind_of_drift(fresh_outputs, what):
    committed = _notebook(("f()", [_stdout("1\n2\n"), _figure()]))
    found = differences(committed, _notebook(("f()", fresh_outputs)))
    assert [f.split(":")[0] for f in found] == [f"code cell 1, {w}" for w in what], found


def test_differences_reports_changed_sources_and_cell_counts():
    committed = _notebook(("a = 1", []), ("b = 2", []))
    assert differences(committed, _notebook(("a = 1", []), ("b = 3", []))) == ["code cell 2: the source differs"]
    assert differences(committed, _notebook(("a = 1", []))) == ["2 code cells committed, 1 executed"]
