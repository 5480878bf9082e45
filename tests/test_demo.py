"""Tests of ``vqref demo`` (vqref/demo/): the report, seeds and summaries, the rate-distortion
runs, the claims' verdicts, reproducibility across processes, option errors, progress."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import subprocess
import sys
from itertools import product

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from vqref import FSQ, LFQ, ResidualVQ, VectorQuantize, demo  # noqa: E402
from vqref.demo.claims import Comparison, compare  # noqa: E402
from vqref.demo.runs import Run, Summary  # noqa: E402
from vqref.demo.train import TAU_END, TAU_START  # noqa: E402

ALL = list(demo.CONFIGS)
QUICK_SEEDS = 2  # the --quick default


def _digits(results: dict) -> dict:
    return results["datasets"]["digits"]


def _run_quietly(argv: list[str]) -> tuple[int, str, str]:
    buf_out, buf_err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = buf_out, buf_err
    try:
        code = demo.main(argv)
    finally:
        sys.stdout, sys.stderr = old
    return code, buf_out.getvalue(), buf_err.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every configuration, two seeds, the default rate-distortion runs, in two worker processes."""
    out = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = _run_quietly(["--quick", "--out", str(out), "--jobs", "2"])
    with open(out / "results.json") as f:
        results = json.load(f)
    return code, out, stdout, stderr, results


def test_quick_run_writes_the_report(quick_run):
    code, out, stdout, stderr, results = quick_run
    assert code == 0
    figures = ("reconstructions.png", "training_curves.png", "codebook_usage.png", "rate_distortion.png")
    for name in ("report.md", "report.html", "results.json", *figures):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    header = "| config | held-out MSE | perplexity | codes used | bits / image | quant. error | train time (s) |"
    assert header.replace(" ", "") in md.replace(" ", "")
    for fig in figures:
        assert f"]({fig})" in md and f'src="{fig}"' in html
    assert "Do the techniques do what their papers claim?" in md and "<h3>Claims</h3>" in html
    # the table is printed to stdout, one row per configuration, in the order asked for
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "config" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ALL
    blob = _digits(results)
    for r in blob["results"]:
        assert 1.0 <= r["perplexity"] <= r["codebook_size"] + 1e-9
        assert 0.0 < r["codes_used"] <= 1.0 and np.isfinite(r["test_mse"]) and r["test_mse"] > 0
        assert len(r["curves"]["step"]) == len(r["curves"]["test_mse"]) > 5
        assert r["curves"]["step"][-1] == r["steps"]
        assert r["quantization_error"] >= 0
    # one summary line per run on stderr (it is not a terminal here, so no progress bar)
    n_runs = len(blob["results"])
    assert n_runs == QUICK_SEEDS * len(blob["summaries"])
    assert sum(line.startswith("[") for line in stderr.splitlines()) == n_runs
    assert "\r" not in stderr


def test_every_configuration_over_every_seed_with_mean_and_std(quick_run):
    """The table's cells are the mean ± the sample standard deviation of the seeds' numbers."""
    _, out, stdout, _, results = quick_run
    blob = _digits(results)
    for name in ALL:
        runs = [r for r in blob["results"] if r["name"] == name and _table(r, results)]
        assert sorted(r["seed"] for r in runs) == list(range(QUICK_SEEDS)), name
        mse = np.array([r["test_mse"] for r in runs])
        cell = f"{mse.mean():.4f} ± {mse.std(ddof=1):.4f}"
        (row,) = [line for line in stdout.splitlines() if line.startswith(f"| {name} ")]
        assert cell in row, (cell, row)
    # the seeds differ (the init and the batches change), the held-out set does not
    ema = [r for r in blob["results"] if r["name"] == "ema" and _table(r, results)]
    assert ema[0]["test_mse"] != ema[1]["test_mse"]


def _table(r: dict, results: dict) -> bool:
    """Whether a result belongs to a table configuration (not an extra rate-distortion run)."""
    K = results["settings"]["codebook_size"]
    want = {"fsq": math.prod(demo.fsq_levels(K)), "lfq": demo.lfq_codebook_size(K)}.get(r["name"], K)
    depth = results["settings"]["depths"] if r["name"].startswith("residual") else 1
    return r["codebook_size"] == want and r["depths"] == depth


def test_quick_run_learns(quick_run):
    """Even the few-second run gets well below the loss at its first evaluation."""
    blob = _digits(quick_run[4])
    for r in blob["results"]:
        c = r["curves"]
        assert c["test_mse"][-1] < 0.8 * c["test_mse"][0], (r["name"], r["codebook_size"])
        assert c["train_loss"][-1] < c["train_loss"][0], r["name"]
    assert min(r["test_mse"] for r in blob["results"]) < blob["mean_image_mse"]


def test_rate_distortion_points_and_bits(quick_run):
    """The extra runs vary K and Q; bits per image = T * sum over depths of log2 K (FSQ: of
    prod(levels)), computed here from the sizes alone."""
    results = quick_run[4]
    st = results["settings"]
    K, Q, T = st["codebook_size"], st["depths"], st["tokens"]
    blob = _digits(results)
    extra = {(s["run"]["config"], s["run"]["codebook_size"], s["run"]["depths"]) for s in blob["summaries"]
             if not s["run"]["table"]}  # fmt: skip
    assert extra == {(c, k, q) for c, k, q in demo.rate_points(K, Q, full=False)}
    for r in blob["results"]:
        q = r["depths"]
        assert q == (Q if r["name"].startswith("residual") and _table(r, results) else q)
        assert r["bits"] == pytest.approx(T * q * math.log2(r["codebook_size"]), abs=1e-12)
    md = (quick_run[1] / "report.md").read_text()
    assert f"{T * Q * int(math.log2(K))} bits: residual" in md  # the residual stacks at equal bits
    # the residual stack of sqrt(K) codes in Q depths spends the bits of one codebook of K codes
    root = round(math.sqrt(K))
    (r,) = [r for r in blob["results"] if r["codebook_size"] == root and r["name"] == "residual" and r["seed"] == 0]
    assert r["bits"] == pytest.approx(T * Q * math.log2(root))


def test_claims_table_is_computed_from_the_run(quick_run):
    """Each row's numbers are the run's: recompute one comparison from results.json."""
    results = quick_run[4]
    blob = _digits(results)
    rows = {c["technique"]: c for c in blob["claims"]}
    assert set(rows) == {c.technique for c in demo.CLAIMS}
    kmeans = [r for r in blob["results"] if r["name"] == "kmeans"]
    ema = [r for r in blob["results"] if r["name"] == "ema" and _table(r, results)]
    rel = np.mean([(a["codes_used"] - b["codes_used"]) / b["codes_used"] for a, b in zip(kmeans, ema)])
    holds = sum(a["codes_used"] > b["codes_used"] for a, b in zip(kmeans, ema))
    measured = rows["k-means init"]["measured here (mean ± std over seeds)"]
    assert f"{rel:+.0%} (higher in {holds}/{QUICK_SEEDS})" in measured
    for row in rows.values():
        assert row["reproduces?"] in ("yes", "no", "partly")
        assert (row["evidence"] == "-") == (row["reproduces?"] == "yes")


def test_same_seeds_same_numbers_in_one_process(quick_run, tmp_path, capsys):
    """A second run in this process, with the configurations in another order and a subset,
    repeats every number of the run made by two worker processes."""
    subset = ["gumbel", "ema"]
    args = ["--quick", "--out", str(tmp_path), "--configs", ",".join(subset), "--rate", "none", "--jobs", "1"]
    assert demo.main([*args, "--quiet"]) == 0
    capsys.readouterr()
    with open(tmp_path / "results.json") as f:
        again = json.load(f)
    assert [s["label"] for s in _digits(again)["summaries"]] == subset
    for name, seed in product(subset, range(QUICK_SEEDS)):
        a = [r for r in _digits(again)["results"] if r["name"] == name and r["seed"] == seed]
        b = [r for r in _digits(quick_run[4])["results"] if r["name"] == name and r["seed"] == seed
             and _table(r, quick_run[4])]  # fmt: skip
        strip = lambda r: {k: v for k, v in r.items() if k != "train_time"}  # noqa: E731
        assert strip(a[0]) == strip(b[0]), (name, seed)


def test_other_seed_other_numbers(quick_run, tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--configs", "ema", "--seed", "1", "--seeds", "1", "--rate", "none"]
    assert demo.main([*args, "--quiet", "--jobs", "1"]) == 0
    assert "| ema" in capsys.readouterr().out
    with open(tmp_path / "results.json") as f:
        other = _digits(json.load(f))["results"]
    first = [r for r in _digits(quick_run[4])["results"] if r["name"] == "ema" and r["seed"] == 0]
    assert other[0]["seed"] == 1 and other[0]["test_mse"] != first[0]["test_mse"]


def test_steps_and_sizes_options(tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--configs", "kmeans,residual", "--steps", "7", "--codebook-size", "9",
            "--train-size", "100", "--batch-size", "20", "--seeds", "1", "--rate", "none", "--jobs", "1",
            "--quiet"]  # fmt: skip
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    runs = _digits(res)["results"]
    assert [r["steps"] for r in runs] == [7, 7]
    assert res["settings"]["train_size"] == 100 and res["settings"]["epochs"] is None
    assert all(len(u) == 9 for r in runs for u in r["usage"])
    assert len(runs[1]["usage"]) == 2  # one histogram per residual depth
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
        (["--seeds", "0"], "positive integer"),
        (["--jobs", "0"], "positive integer"),
        (["--data", "faces"], "expected digits or photos"),
        (["--data", "digits,digits"], "once each"),
        (["--rate", "most"], "invalid choice"),
        (["--quick", "--full"], "contradict each other"),
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


def test_presets_and_seeds():
    default = demo.parse_args(["--out", "x"])
    assert default.seeds == [0, 1, 2] and default.data == ["digits"] and default.rate == "default"
    full = demo.parse_args(["--full", "--out", "x", "--seed", "4"])
    assert full.seeds == [4, 5, 6, 7, 8] and full.data == ["digits", "photos"] and full.rate == "full"
    assert full.epochs > default.epochs
    assert demo.parse_args(["--out", "x", "--seeds", "1", "--jobs", "3"]).jobs == 3


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


def _tiny(steps: int = 9, K: int = 8, **kw) -> demo.TrainSettings:
    return demo.TrainSettings(codebook_size=K, hidden=16, tokens=2, token_dim=4, batch_size=16, lr=2e-3, seed=0,
                              steps=steps, **kw)  # fmt: skip


def test_training_loop_reports_progress():
    """``train_one``'s progress callback sees every step, with a finite running loss."""
    train, test, _ = demo.load_data(0, 64)
    seen = []
    r = demo.train_one("ema", _tiny(), train, test, np.arange(3), progress=lambda step, loss: seen.append((step, loss)))
    assert [step for step, _ in seen] == list(range(1, 10)) and r.steps == 9
    assert all(np.isfinite(loss) and loss > 0 for _, loss in seen)
    assert np.asarray(r.recon).shape == (3, 64)


def test_gumbel_temperature_is_annealed_per_call(monkeypatch):
    """The gumbel configuration's forward gets gumbel_temperature(step, total) at every step; the
    others get no temperature."""
    from vqref.nn import VQVAE

    seen = []
    real = VQVAE.forward

    def spy(self, x, **kw):
        if self.training:
            seen.append(kw.get("sample_codebook_temp"))
        return real(self, x, **kw)

    monkeypatch.setattr(VQVAE, "forward", spy)
    train, test, _ = demo.load_data(0, 64)
    demo.train_one("gumbel", _tiny(steps=12), train, test, np.arange(2))
    assert seen == [pytest.approx(demo.gumbel_temperature(t, 12), rel=1e-15) for t in range(12)]
    seen.clear()
    demo.train_one("learnable", _tiny(steps=3), train, test, np.arange(2))
    assert seen == [None] * 3


def test_gumbel_schedule():
    taus = [demo.gumbel_temperature(t, 100) for t in range(101)]
    assert taus[0] == TAU_START and taus[-1] == pytest.approx(TAU_END, rel=1e-12)
    ratios = np.array(taus[1:]) / np.array(taus[:-1])
    np.testing.assert_allclose(ratios, (TAU_END / TAU_START) ** 0.01, rtol=1e-12)  # geometric


def test_fsq_levels_and_lfq_sizes():
    """The paper's levels where it gives them; otherwise the product closest to K (an exhaustive
    search over the balanced mixes as the oracle), at least 3 levels per channel."""
    assert demo.fsq_levels(256) == [8, 6, 5] and demo.fsq_levels(1024) == [8, 5, 5, 5]
    assert demo.fsq_levels(2**16) == [8, 8, 8, 5, 5, 5]
    assert demo.fsq_levels(16) == [4, 4] and demo.fsq_levels(64) == [8, 8]
    for K in [2, 3, 5, 9, 17, 32, 100, 500, 3000]:
        levels = demo.fsq_levels(K)
        assert min(levels) >= 3 and FSQ(levels, dim=4).codebook_size == math.prod(levels)
        n = len(levels)
        mixes = [[a + 1] * j + [a] * (n - j) for a in range(3, 40) for j in range(n + 1)]
        best = min(abs(math.log(math.prod(m) / K)) for m in mixes)
        assert abs(math.log(math.prod(levels) / K)) == pytest.approx(best, abs=1e-12), K
    assert [demo.lfq_codebook_size(K) for K in (1, 2, 3, 5, 6, 256, 300, 400)] == [2, 2, 4, 4, 8, 256, 256, 512]
    assert LFQ(dim=4, codebook_size=demo.lfq_codebook_size(100)).codebook_size == 128


def test_bits_per_image():
    T = 5
    assert demo.bits_per_image(VectorQuantize(4, 256), T) == 40
    assert demo.bits_per_image(ResidualVQ(dim=4, codebook_size=16, num_quantizers=3), T) == 60
    assert demo.bits_per_image(ResidualVQ(dim=4, codebook_size=16, num_quantizers=3, shared_codebook=True), T) == 60
    assert demo.bits_per_image(FSQ([8, 6, 5], dim=4), T) == pytest.approx(T * math.log2(240))
    assert demo.bits_per_image(FSQ([5, 3], num_codebooks=2), T) == pytest.approx(2 * T * math.log2(15))
    assert demo.bits_per_image(LFQ(dim=4, codebook_size=64), T) == 30
    assert demo.bits_per_image(VectorQuantize(4, 1), T) == 0


def test_plan_rate_points_without_duplicates():
    runs = demo.plan(["digits"], ["ema", "residual", "fsq"], [0, 1], 16, 2, rate="default")
    table = [r for r in runs if r.table]
    assert [(r.config, r.seed) for r in table] == [(c, s) for c in ("ema", "residual", "fsq") for s in (0, 1)]
    extra = {(r.config, r.codebook_size, r.depths) for r in runs if not r.table}
    # K // 16 = 1 -> 2 codes; 4K; residual sqrt(16) = 4 codes in 2 depths, and 16 codes in 3
    assert extra == {("ema", 2, 1), ("ema", 64, 1), ("fsq", 2, 1), ("residual", 4, 2), ("residual", 16, 3)}
    assert len(runs) == 2 * (3 + len(extra))
    assert demo.plan(["digits"], ["ema"], [0], 16, 2, rate="none") == [Run("digits", "ema", 16, 2, 0, True)]


def _summary(config: str, values: list[float], metric: str = "test_mse") -> Summary:
    results = [demo.RunResult(config, "", 0.0, 1.0, 1.0, 0.0, 1, seed=i) for i in range(len(values))]
    for r, v in zip(results, values):
        setattr(r, metric, v)
    return Summary(Run("digits", config, 8, 1, 0, True), results)


@pytest.mark.parametrize(
    "a, b, better, margin, verdict",
    [
        ([1.0, 2.0, 3.0], [1.1, 2.1, 3.1], "lower", 0.0, "holds"),
        ([1.2, 2.2, 3.2], [1.1, 2.1, 3.1], "lower", 0.0, "contradicted"),
        ([1.0, 2.2, 3.0], [1.1, 2.1, 3.1], "lower", 0.0, "mixed"),
        ([1.0, 2.2, 3.0], [1.1, 2.1, 3.1], "higher", 0.0, "mixed"),
        ([1.2, 2.2, 3.2], [1.1, 2.1, 3.1], "higher", 0.0, "holds"),
        ([1.05, 1.09, 0.5], [1.0, 1.0, 1.0], "lower", 0.10, "holds"),  # within 10 % worse
        ([1.2, 1.11, 1.5], [1.0, 1.0, 1.0], "lower", 0.10, "contradicted"),  # all beyond it
        ([1.2, 1.05, 1.5], [1.0, 1.0, 1.0], "lower", 0.10, "mixed"),
        ([2.0, 2.0], [2.0, 2.0], "lower", 0.0, "mixed"),  # a tie is neither
    ],
)
def test_claim_verdicts(a, b, better, margin, verdict):
    o = compare(Comparison("A", "B", "test_mse", better, margin), _summary("A", a), _summary("B", b))
    assert o.verdict == verdict
    rel = (np.array(a) - np.array(b)) / np.array(b)
    np.testing.assert_allclose(o.rel, rel, rtol=1e-15)
    assert f"{np.mean(rel):+.0%}" in o.text()


def test_photos_run_with_the_convolutional_model(tmp_path, capsys):
    """``--data photos``: patches of the bundled photographs through the convolutional model,
    FSQ behind the adapter, the Gumbel temperature through the annealing wrapper."""
    args = ["--quick", "--data", "photos", "--configs", "ema,fsq,gumbel", "--seeds", "1", "--rate", "none",
            "--jobs", "1", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    assert demo.main(args) == 0
    assert "| gumbel" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())["datasets"]["photos"]
    for r in res["results"]:
        assert np.isfinite(r["test_mse"]) and r["bits"] == pytest.approx(16 * math.log2(r["codebook_size"]))
        assert np.asarray(r["curves"]["test_mse"]).size >= 5
    for name in ("photos_reconstructions.png", "photos_rate_distortion.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Photographs (16x16 patches" in (tmp_path / "report.md").read_text()


def test_photos_gumbel_temperature_reaches_the_quantizer(monkeypatch):
    """The convolutional model's Gumbel quantizer samples with the schedule's temperature."""
    from vqref.demo.datasets import load_dataset, make_model

    seen = []
    real = VectorQuantize.forward

    def spy(self, x, **kw):
        if self.training:
            seen.append(kw.get("sample_codebook_temp"))
        return real(self, x, **kw)

    monkeypatch.setattr(VectorQuantize, "forward", spy)
    data = load_dataset("photos", 0, 32, 16)
    s = demo.TrainSettings(codebook_size=8, hidden=4, tokens=0, token_dim=4, batch_size=8, lr=1e-3, seed=0, steps=5,
                           evals=2)  # fmt: skip
    demo.train_one("gumbel", s, data.train, data.test, np.arange(2), model=make_model("photos", "gumbel", s))
    assert seen == [pytest.approx(demo.gumbel_temperature(t, 5), rel=1e-15) for t in range(5)]


def test_code_usage_and_perplexity():
    idx = np.array([[[0, 1], [0, 2]], [[3, 1], [0, 1]]])  # (N=2, T=2, Q=2)
    per_depth = demo.code_usage(idx, 5, shared=False)
    assert [c.tolist() for c in per_depth] == [[3, 0, 0, 1, 0], [0, 3, 1, 0, 0]]
    (pooled,) = demo.code_usage(idx, 5, shared=True)
    assert pooled.tolist() == [3, 3, 1, 1, 0]
    assert demo.perplexity(np.array([4, 0, 0])) == pytest.approx(1.0)
    assert demo.perplexity(np.array([2, 2, 2, 2])) == pytest.approx(4.0)
    assert demo.perplexity(np.zeros(3)) == pytest.approx(1.0)  # no tokens: no NaN


def test_quantization_error_is_measured_on_the_tokens():
    """The relative error recomputed from the encoder's tokens and the nearest codebook rows."""
    train, test, _ = demo.load_data(0, 64)
    s = _tiny(steps=5)
    model = demo.build_model("ema", s)
    demo.train_one("ema", s, train, test, np.arange(2), model=model)
    z = np.asarray(model.encoder.apply(test)[0]).reshape(-1, 4)  # (N T, d)
    C = np.asarray(model.quantizer.codebook, dtype=np.float64)
    q = C[np.argmin(((z[:, None, :] - C[None]) ** 2).sum(-1), axis=1)]
    expected = np.sum((z - q) ** 2) / np.sum(z**2)
    assert demo.quantization_error(model, test) == pytest.approx(expected, rel=1e-5)


def test_one_code_carries_no_information(tmp_path, capsys):
    """With K = 1 every image gets the same codes, so the decoder can at best paint one image for
    all of them: the held-out error cannot beat the mean image's (up to train/test drift)."""
    args = ["--quick", "--out", str(tmp_path), "--configs", "ema,residual", "--codebook-size", "1", "--steps", "60",
            "--seeds", "1", "--rate", "none", "--jobs", "1", "--quiet"]  # fmt: skip
    assert demo.main(args) == 0
    capsys.readouterr()
    with open(tmp_path / "results.json") as f:
        res = _digits(json.load(f))
    for r in res["results"]:
        assert r["perplexity"] == pytest.approx(1.0) and r["codes_used"] == 1.0 and r["bits"] == 0
        assert r["test_mse"] > 0.97 * res["mean_image_mse"], r["name"]
