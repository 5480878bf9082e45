"""``vqref demo``, the main job: train small VQ-VAEs on scikit-learn's digits, compare the techniques.

Three files, one job each:

* :mod:`vqref.demo.train`  -- the data, the eight quantizer configurations, the training loop
  (Adam, hand-written gradients) and the evaluation (held-out MSE, perplexity, code usage).
  Read this one to see how a VQ-VAE is trained with vqref.
* :mod:`vqref.demo.report` -- ``report.md``, ``report.html``, ``results.json`` and the figures.
* :mod:`vqref.demo.cli`    -- the options, progress bars and the order of the work (:func:`main`).

``python -m vqref demo``, ``vqref demo`` and ``python -m vqref.demo`` run :func:`main`.  It needs
the ``demo`` extra (scikit-learn, matplotlib, tqdm; no torch): ``pip install -e ".[demo]"``.
"""

from .cli import Settings, main, parse_args, progress_bar
from .report import format_table, write_report
from .train import (
    CONFIGS,
    RunResult,
    TrainingDiverged,
    TrainSettings,
    build_model,
    code_usage,
    evaluate,
    load_data,
    perplexity,
    train_one,
)

__all__ = [
    "CONFIGS",
    "RunResult",
    "Settings",
    "TrainSettings",
    "TrainingDiverged",
    "build_model",
    "code_usage",
    "evaluate",
    "format_table",
    "load_data",
    "main",
    "parse_args",
    "perplexity",
    "progress_bar",
    "train_one",
    "write_report",
]
