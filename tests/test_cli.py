"""The command line never shows a traceback: hostile invocations of ``vqref`` and ``vqref demo``.

Every invocation below must end with a non-zero status (2 for bad usage, 1 when the run or its
surroundings fail, 130 when interrupted) and one line on stderr that says what to change --
or argparse's usage text ending in that line -- and never a Python traceback.  The ones that
fail before training are checked not to load data or train anything, so they are fast.  Run
in-process through ``vqref.cli.main(argv)``; a few run as a subprocess.
"""

from __future__ import annotations

import builtins
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

from vqref import cli  # noqa: E402
from vqref.demo import checks  # noqa: E402
from vqref.demo import cli as demo_cli  # noqa: E402
from vqref.demo.train import RunResult  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the smallest run: one configuration, one seed, one step, a tiny model, in this process
ONE = ["--seeds", "1", "--rate", "none", "--jobs", "1"]
TINY = ["--quick", "--configs", "ema", "--steps", "1", "--codebook-size", "4", "--hidden", "8", "--quiet", *ONE]
TINY_DATA = ["--train-size", "32", "--batch-size", "32"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``vqref ARGV`` in-process: (status, stdout, stderr), whether it returns or exits."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def the_message(err: str) -> str:
    """The one line a failure prints: stderr is that line, or argparse's usage text ending in it."""
    lines = err.strip().splitlines()
    assert lines, "nothing on stderr"
    if lines[0].startswith("usage:"):
        assert lines[-1].startswith("vqref demo: error: "), err
        return lines[-1]
    assert len(lines) == 1, f"more than one line on stderr:\n{err}"
    return lines[0]


def assert_clean_failure(code, out, err, status, fragment):
    assert "Traceback" not in out + err, err
    assert code == status, (code, err)
    message = the_message(err)
    assert fragment in message, message
    return message


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the command gets as far as loading data or training."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the command went on to load data or train")

    monkeypatch.setattr(demo_cli, "load_dataset", forbidden)
    monkeypatch.setattr(demo_cli, "train_run", forbidden)


# --------------------------------------------------------------------------------------------
# Bad usage: status 2, before anything is loaded
# --------------------------------------------------------------------------------------------

USAGE = [
    (["--seed", "-1"], "non-negative integer"),
    (["--seed", "1.5"], "non-negative integer"),
    (["--seed"], "expected one argument"),
    (["--epochs", "-1"], "positive integer"),
    (["--epochs"], "expected one argument"),
    (["--batch-size", "0"], "positive integer"),
    (["--quick", "--steps", "0"], "positive integer"),
    (["--steps", "1e3"], "positive integer, got '1e3'"),
    (["--codebook-size", str(10**12)], "--codebook-size 1000000000000 is the largest part"),
    (["--codebook-size", "10**12"], "positive integer"),
    (["--hidden", str(10**12)], "--hidden 1000000000000 is the largest part"),
    (["--quick", "--configs", "orthogonal", "--codebook-size", str(10**7)], "of memory"),
    (["--train-size", "0"], "positive integer"),
    (["--train-size", str(10**15)], "larger than the 1437 training images"),
    (["--train-size", "10"], "the default --batch-size 64 is larger than --train-size 10"),
    (["--quick", "--batch-size", "300"], "larger than the --quick default --train-size 256"),
    (["--tokens", str(10**12)], "latent features"),
    (["--token-dim", "1"], "'rotation' cannot be built"),
    (["--configs", "all,ema"], "'all' already means every configuration"),
    (["--configs", "ema,all"], "'all' already means every configuration"),
    (["--configs", "ema,ema"], "'ema' listed twice"),
    (["--configs", "EMA"], "did you mean 'ema'"),
    (["--configs", "nope"], "unknown configuration(s) 'nope'"),
    (["--configs", ","], "(none given)"),
    (["--configs"], "expected one argument"),
    (["--lr", "0"], "positive number"),
    (["--lr", "nan"], "positive number"),
    (["--lr", "inf"], "positive number"),
    (["--lr", "abc"], "positive number"),
    (["--out"], "expected one argument"),
    (["--out", ""], "--out is empty"),
    (["--out", "  "], "--out is empty"),
    (["--out", os.devnull], "is not a folder"),
    (["--epochs", "2", "--steps", "3"], "not allowed with"),
    (["--frobnicate"], "unrecognized arguments"),
]


@pytest.mark.parametrize("args, fragment", USAGE, ids=[" ".join(a)[:40] for a, _ in USAGE])
def test_bad_usage_is_one_message_and_status_2(args, fragment, tmp_path, capsys, no_training):
    out = [] if "--out" in args else ["--out", str(tmp_path / "never")]
    assert_clean_failure(*run(["demo", *args, *out], capsys), 2, fragment)
    assert not (tmp_path / "never").exists()


def test_out_pointing_at_a_file(tmp_path, capsys, no_training):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert_clean_failure(*run(["demo", *TINY, "--out", str(f)], capsys), 2, "exists and is not a folder")
    assert f.read_text() == "x"


def test_token_dim_1_is_fine_without_the_rotation_trick(tmp_path):
    """The refusal names the one configuration that cannot take the option, and only it."""
    s = demo_cli.parse_args(["--quick", "--configs", "ema,cosine,residual", "--token-dim", "1", "--out", str(tmp_path)])
    assert s.token_dim == 1


@pytest.mark.parametrize(
    "argv, fragment",
    [([], "which command?"), (["frobnicate"], "unknown command 'frobnicate'"), (["bench"], "moved")],
)
def test_the_top_level_command(argv, fragment, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert fragment in err.splitlines()[0]


# --------------------------------------------------------------------------------------------
# The report folder: checked (created and written into) before anything is trained
# --------------------------------------------------------------------------------------------


def test_out_below_a_file(tmp_path, capsys, no_training):
    (tmp_path / "a_file").write_text("x")
    msg = assert_clean_failure(
        *run(["demo", *TINY, "--out", str(tmp_path / "a_file" / "sub")], capsys), 1, "cannot create"
    )
    assert "--out" in msg


def test_out_name_too_long(tmp_path, capsys, no_training):
    assert_clean_failure(*run(["demo", *TINY, "--out", str(tmp_path / ("x" * 300))], capsys), 1, "cannot create")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("out, fragment", [("/proc/x", "cannot create"), ("/proc", "cannot write into")])
def test_out_in_proc(out, fragment, capsys, no_training):
    assert_clean_failure(*run(["demo", *TINY, "--out", out], capsys), 1, fragment)


def test_out_not_writable(tmp_path, capsys, monkeypatch, no_training):
    """A folder that exists but refuses files (simulated: root may write anywhere)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checks.tempfile, "TemporaryFile", refuse)
    msg = assert_clean_failure(*run(["demo", *TINY, "--out", str(tmp_path)], capsys), 1, "cannot write into")
    assert "Permission denied" in msg and "choose another --out" in msg


def test_out_where_a_report_file_is_a_folder(tmp_path, capsys, no_training):
    (tmp_path / "report.md").mkdir()
    assert_clean_failure(*run(["demo", *TINY, "--out", str(tmp_path)], capsys), 1, "report.md")


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


def test_without_matplotlib(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert_clean_failure(*run(["demo", *TINY, "--out", str(tmp_path)], capsys), 1, "needs matplotlib")


def test_with_a_broken_matplotlib(tmp_path, capsys, monkeypatch, no_training):
    """matplotlib raises ValueError on import when MPLBACKEND names no backend."""
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "matplotlib":
            raise ValueError("Key backend: 'bogus' is not a valid value for backend")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    msg = assert_clean_failure(*run(["demo", *TINY, "--out", str(tmp_path)], capsys), 1, "importing matplotlib failed")
    assert "bogus" in msg


def test_hostile_thread_settings_in_a_subprocess(tmp_path):
    """Nonsense BLAS/OpenMP thread counts in the environment, and a bad option: status 2, one message."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(OPENBLAS_NUM_THREADS="-4", OMP_NUM_THREADS="many", MKL_NUM_THREADS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "vqref", "demo", "--seed", "-1", "--out", str(tmp_path / "never")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("vqref demo: error: argument --seed")
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------
# Failures during the run: status 1 (130 when interrupted), one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, lr", [("ema", "1e300"), ("learnable", "1e6")])
def test_a_diverging_learning_rate_stops_the_run(config, lr, tmp_path, capsys):
    args = ["demo", "--quick", "--configs", config, "--steps", "20", "--lr", lr, *TINY_DATA, "--quiet", *ONE]
    msg = assert_clean_failure(*run([*args, "--out", str(tmp_path)], capsys), 1, "training diverged at epoch")
    assert f"of config {config} (loss = " in msg and msg.endswith(f"lower --lr (it is {float(lr):g})")
    assert not (tmp_path / "report.md").exists()


def test_divergence_in_a_worker_process_is_the_same_message(tmp_path, capsys):
    """With two worker processes the run's exception crosses the process boundary intact."""
    args = ["demo", "--quick", "--configs", "ema", "--steps", "5", "--lr", "1e300", *TINY_DATA, "--quiet"]
    args += ["--seeds", "2", "--rate", "none", "--jobs", "2", "--out", str(tmp_path)]
    msg = assert_clean_failure(*run(args, capsys), 1, "training diverged at epoch 1 of config ema")
    assert msg.endswith("lower --lr (it is 1e+300)")


def test_divergence_without_quiet_ends_with_the_message(tmp_path, capsys):
    """Not quiet: the run's header line comes first; the failure is still the one last line."""
    args = ["demo", "--quick", "--configs", "ema", "--steps", "5", "--lr", "1e300", *TINY_DATA, *ONE]
    code, out, err = run([*args, "--out", str(tmp_path)], capsys)
    assert code == 1 and "Traceback" not in err and "RuntimeWarning" not in err
    assert err.strip().splitlines()[-1].startswith("vqref demo: training diverged at epoch 1 of config ema")


def test_a_sane_learning_rate_does_not_diverge(tmp_path, capsys):
    """Negative control: the same run with the default learning rate finishes."""
    args = ["demo", "--quick", "--configs", "ema", "--steps", "20", *TINY_DATA, "--quiet", *ONE]
    code, _, err = run([*args, "--out", str(tmp_path)], capsys)
    assert code == 0 and err == "" and (tmp_path / "report.md").is_file()


def _fake_result(run, s, split_seed, sizes, progress=None):
    return RunResult(run.config, "fake", 0.1, 1.0, 1.0, 0.0, 1, curves={}, usage=[[1]], recon=[[0.0] * 64] * 10)


@pytest.mark.parametrize(
    "raised, status, fragment",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (MemoryError("Unable to allocate 7.28 TiB"), 1, "out of memory (Unable to allocate 7.28 TiB)"),
        (OSError(28, "No space left on device"), 1, "No space left on device"),
        (ValueError("something vqref refused\nover two lines"), 1, "something vqref refused over two lines"),
    ],
)
def test_failures_during_the_run(raised, status, fragment, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(demo_cli, "train_run", fail)
    assert_clean_failure(*run(["demo", *TINY, *TINY_DATA, "--out", str(tmp_path)], capsys), status, fragment)


def test_a_report_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo_cli, "train_run", _fake_result)
    monkeypatch.setattr(demo_cli, "write_report", full_disk)
    msg = assert_clean_failure(
        *run(["demo", *TINY, *TINY_DATA, "--out", str(tmp_path)], capsys), 1, "report could not be written"
    )
    assert "No space left" in msg


# --------------------------------------------------------------------------------------------
# Paths that are unusual but valid: the run succeeds
# --------------------------------------------------------------------------------------------

NAMES = ["ünïcødé ✓ 字", "with space"] + (["not-utf8-\udcff"] if sys.platform.startswith("linux") else [])


@pytest.mark.parametrize("name", NAMES)
def test_unusual_report_folder_names(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_cli, "train_run", _fake_result)  # the report is what is tested here
    monkeypatch.setattr(demo_cli, "write_report", lambda sections, s, *a: {"report": os.path.join(s.out, "report.md")})
    out = str(tmp_path / name)
    code, stdout, err = run(["demo", *TINY, *TINY_DATA, "--out", out], capsys)
    assert code == 0 and "Traceback" not in err and err == ""
    assert os.path.isdir(out)
    assert "report: " in stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names that are not UTF-8")
def test_report_files_with_a_name_that_is_not_utf8(tmp_path, capsys):
    """The full report under a folder whose name has bytes that are not UTF-8 (escaped in the text files)."""
    out = tmp_path / "bytes-\udcff"
    code, stdout, err = run(["demo", *TINY, *TINY_DATA, "--out", str(out)], capsys)
    assert code == 0 and err == ""
    assert "\\udcff" in stdout and "\\udcff" in (out / "report.md").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"]["out"] == str(out)
    assert np.isfinite(results["datasets"]["digits"]["results"][0]["test_mse"])
