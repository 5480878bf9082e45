"""``vqref demo``, the main job: train small VQ-VAEs on real images, compare the techniques.

The files, one job each:

* :mod:`vqref.demo.train`      -- the quantizer configurations and the training loop (Adam,
  hand-written gradients) of one run.  Read this one to see how a VQ-VAE is trained with vqref.
* :mod:`vqref.demo.evaluation` -- what is measured: held-out MSE, perplexity, codes used,
  quantization error, bits per image.
* :mod:`vqref.demo.datasets`   -- the digits (MLP model) and the photo patches (convolutional model).
* :mod:`vqref.demo.runs`       -- which runs (configurations x seeds, rate-distortion points), in
  one process or a pool, and the summaries over seeds.
* :mod:`vqref.demo.claims`     -- the papers' claims, tested seed by seed on the run's numbers.
* :mod:`vqref.demo.report`, :mod:`vqref.demo.figures` -- ``report.md``, ``report.html``,
  ``results.json`` and the figures.
* :mod:`vqref.demo.checks`, :mod:`vqref.demo.cli` -- the checks before training, the options,
  progress bars and the order of the work (:func:`main`).

``python -m vqref demo``, ``vqref demo`` and ``python -m vqref.demo`` run :func:`main`.  It needs
the ``demo`` extra (scikit-learn, matplotlib, tqdm; no torch): ``pip install -e ".[demo]"``.
"""

from .claims import CLAIMS, evaluate_claims
from .cli import Settings, main, parse_args, progress_bar
from .evaluation import bits_per_image, code_usage, evaluate, perplexity, quantization_error
from .report import format_table, write_report
from .runs import Run, Summary, plan, rate_points, summarise
from .train import (
    CONFIGS,
    RunResult,
    TrainingDiverged,
    TrainSettings,
    build_model,
    fsq_levels,
    gumbel_temperature,
    lfq_codebook_size,
    load_data,
    train_one,
)

__all__ = [
    "CLAIMS",
    "CONFIGS",
    "Run",
    "RunResult",
    "Settings",
    "Summary",
    "TrainSettings",
    "TrainingDiverged",
    "bits_per_image",
    "build_model",
    "code_usage",
    "evaluate",
    "evaluate_claims",
    "format_table",
    "fsq_levels",
    "gumbel_temperature",
    "lfq_codebook_size",
    "load_data",
    "main",
    "parse_args",
    "perplexity",
    "plan",
    "progress_bar",
    "quantization_error",
    "rate_points",
    "summarise",
    "train_one",
    "write_report",
]
