"""Tests of ``vqref demo`` (vqref/demo/): the report, reproducibility, option errors, progress."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from vqref import demo  # noqa: E402

ALL = list(demo.CONFIGS)


def _numbers(results: dict, name: str) -> dict:
    """Everything a run computed for one configuration, except the wall-clock time."""
    (r,) = [r for r in results["results"] if r["name"] == name]
    return {k: v for k, v in r.items() if k != "train_time"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    buf_out, buf_err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = buf_out, buf_err
    try:
        code = demo.main(["--quick", "--out", str(out)])
    finally:
        sys.stdout, sys.stderr = old
    with open(out / "results.json") as f:
        results = json.load(f)
    return code, out, buf_out.getvalue(), buf_err.getvalue(), results


def test_quick_run_writes_the_report(quick_run):
    code, out, stdout, stderr, results = quick_run
    assert code == 0
    for name in (
        "report.md",
        "report.html",
        "results.json",
        "reconstructions.png",
        "training_curves.png",
        "codebook_usage.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("reconstructions.png", "training_curves.png", "codebook_usage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    header = "| config | held-out MSE | perplexity | codes used | train time (s) |"
    assert header.replace(" ", "") in md.replace(" ", "")
    for fig in ("reconstructions.png", "training_curves.png", "codebook_usage.png"):
        assert f"]({fig})" in md and f'src="{fig}"' in html
    # the table is printed to stdout, one row per configuration, in the order asked for
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "config" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ALL
    for r in results["results"]:
        assert f"{r['test_mse']:.4f}" in md and f"{r['test_mse']:.4f}" in stdout
        assert 1.0 <= r["perplexity"] <= results["settings"]["codebook_size"] + 1e-9
        assert 0.0 < r["codes_used"] <= 1.0
        assert np.isfinite(r["test_mse"]) and r["test_mse"] > 0
        assert len(r["curves"]["step"]) == len(r["curves"]["test_mse"]) > 5
        assert r["curves"]["step"][-1] == r["steps"]
    # one summary line per run on stderr (it is not a terminal here, so no progress bar)
    assert sum(line.startswith("[") for line in stderr.splitlines()) == len(ALL)
    assert "\r" not in stderr


def test_quick_run_learns(quick_run):
    """Even the few-second run gets well below the loss at its first evaluation."""
    for r in quick_run[4]["results"]:
        c = r["curves"]
        assert c["test_mse"][-1] < 0.8 * c["test_mse"][0], r["name"]
        assert c["train_loss"][-1] < c["train_loss"][0], r["name"]
    mean_image = quick_run[4]["mean_image_mse"]
    assert min(r["test_mse"] for r in quick_run[4]["results"]) < mean_image


def test_same_seed_same_numbers(quick_run, tmp_path, capsys):
    """A second run, with the configurations in another order and a subset, repeats every number."""
    subset = ["residual-shared", "rotation", "ema"]
    assert demo.main(["--quick", "--out", str(tmp_path), "--configs", ",".join(subset), "--quiet"]) == 0
    capsys.readouterr()
    with open(tmp_path / "results.json") as f:
        again = json.load(f)
    assert [r["name"] for r in again["results"]] == subset
    for name in subset:
        assert _numbers(again, name) == _numbers(quick_run[4], name), name


def test_other_seed_other_numbers(quick_run, tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path), "--configs", "ema", "--seed", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| ema" in out
    with open(tmp_path / "results.json") as f:
        other = json.load(f)
    assert other["results"][0]["test_mse"] != _numbers(quick_run[4], "ema")["test_mse"]


def test_steps_and_sizes_options(tmp_path, capsys):
    args = [
        "--quick",
        "--out",
        str(tmp_path),
        "--configs",
        "kmeans,residual",
        "--steps",
        "7",
        "--codebook-size",
        "9",
        "--train-size",
        "100",
        "--batch-size",
        "20",
        "--quiet",
    ]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert [r["steps"] for r in res["results"]] == [7, 7]
    assert res["settings"]["train_size"] == 100 and res["settings"]["epochs"] is None
    assert all(len(u) == 9 for r in res["results"] for u in r["usage"])
    assert len(res["results"][1]["usage"]) == 2  # one histogram per residual depth
    assert "of 9" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "ema,nope"], "unknown configuration"),
        (["--configs", "ema,ema"], "twice"),
        (["--configs", ","], "unknown configuration"),
        (["--epochs", "0"], "positive integer"),
        (["--steps", "-3"], "positive integer"),
        (["--batch-size", "many"], "positive integer"),
        (["--codebook-size", "1.5"], "positive integer"),
        (["--train-size", "5000"], "larger than"),
        (["--train-size", "10", "--batch-size", "32"], "larger than --train-size"),
        (["--epochs", "2", "--steps", "3"], "not allowed with"),
        (["--lr", "-1"], "positive number"),
        (["--token-dim", "1"], "rotation_trick needs dim > 1"),
        (["--seed", "zero"], "non-negative integer"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_options_exit_with_status_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main([*args, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: vqref demo" in err
    assert not (tmp_path / "never").exists()  # nothing written


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--quick", "--out", str(f)])
    assert exc.value.code == 2 and "not a folder" in capsys.readouterr().err


def test_command_line_entry_points(tmp_path):
    """``python -m vqref demo`` with a bad option: status 2 and the message on stderr."""
    root = str(pathlib.Path(__file__).resolve().parents[1])  # the repository, in case vqref is not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "vqref", "demo", "--configs", "bogus"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown configuration(s) 'bogus'" in proc.stderr and proc.stdout == ""
    from vqref import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--steps", "0"])
    assert exc.value.code == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_off_it():
    """tqdm draws on a terminal and clears its line when done; on a pipe or when quiet, nothing."""
    term = _Terminal()
    with demo.progress_bar("[1/2] ema", 50, stream=term) as bar:
        for i in range(1, 51):
            bar.set_postfix_str("loss 0.1", refresh=False)
            bar.update(i - bar.n)
    text = term.getvalue()
    assert text.startswith("\r[1/2] ema") and "/50" in text
    assert text.endswith("\r") and "\n" not in text  # leave=False: the summary line takes its place

    for stream, quiet in ((io.StringIO(), False), (_Terminal(), True)):
        with demo.progress_bar("[1/2] ema", 50, stream=stream, quiet=quiet) as bar:
            bar.update(50)
        assert bar.disable and stream.getvalue() == ""


def test_training_loop_reports_progress():
    """``train_one``'s progress callback sees every step, with a finite running loss."""
    train, test, _ = demo.load_data(0, 64)
    s = demo.TrainSettings(codebook_size=8, hidden=16, tokens=2, token_dim=4, batch_size=16, lr=2e-3, seed=0, steps=9)
    seen = []
    r = demo.train_one("ema", s, train, test, np.arange(3), progress=lambda step, loss: seen.append((step, loss)))
    assert [step for step, _ in seen] == list(range(1, 10)) and r.steps == 9
    assert all(np.isfinite(loss) and loss > 0 for _, loss in seen)
    assert np.asarray(r.recon).shape == (3, 64)


def test_code_usage_and_perplexity():
    idx = np.array([[[0, 1], [0, 2]], [[3, 1], [0, 1]]])  # (N=2, T=2, Q=2)
    per_depth = demo.code_usage(idx, 5, shared=False)
    assert [c.tolist() for c in per_depth] == [[3, 0, 0, 1, 0], [0, 3, 1, 0, 0]]
    (pooled,) = demo.code_usage(idx, 5, shared=True)
    assert pooled.tolist() == [3, 3, 1, 1, 0]
    assert demo.perplexity(np.array([4, 0, 0])) == pytest.approx(1.0)
    assert demo.perplexity(np.array([2, 2, 2, 2])) == pytest.approx(4.0)
    assert demo.perplexity(np.zeros(3)) == pytest.approx(1.0)  # no tokens: no NaN


def test_one_code_carries_no_information(tmp_path, capsys):
    """With K = 1 every image gets the same codes, so the decoder can at best paint one image for
    all of them: the held-out error cannot beat the mean image's (up to train/test drift)."""
    args = [
        "--quick",
        "--out",
        str(tmp_path),
        "--configs",
        "ema,residual",
        "--codebook-size",
        "1",
        "--steps",
        "60",
        "--quiet",
    ]
    assert demo.main(args) == 0
    capsys.readouterr()
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    for r in res["results"]:
        assert r["perplexity"] == pytest.approx(1.0) and r["codes_used"] == 1.0
        assert r["test_mse"] > 0.97 * res["mean_image_mse"], r["name"]
