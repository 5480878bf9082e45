"""Backend parametrisation shared by the whole suite.

Every test that takes the ``bk`` fixture runs on numpy float64, numpy float32,
array_api_strict float64 and array_api_strict float32, and on cupy (marked ``gpu``) where a GPU
exists.  ``bk64`` is the float64 subset, for finite differences and autograd references.
Inputs are always generated on the host from a seeded numpy Generator and moved with
``bk.asarray``, so every backend sees identical numbers.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from vqref import backend as B


def _cupy_usable() -> bool:
    try:
        cp = importlib.import_module("cupy")
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@dataclass(frozen=True)
class Backend:
    name: str  # library name
    dtype_name: str  # "float64" | "float32"
    xp: Any  # Array API namespace
    module: Any  # the library module itself (numpy, cupy, array_api_strict)

    @property
    def dtype(self):
        return getattr(self.xp, self.dtype_name)

    @property
    def is64(self) -> bool:
        return self.dtype_name == "float64"

    @property
    def rtol(self) -> float:
        """Tolerance for comparing this backend's results with a float64 reference."""
        return 1e-10 if self.is64 else 2e-5

    def asarray(self, a, dtype=None):
        a = np.asarray(a)
        if dtype is None and np.issubdtype(a.dtype, np.floating):
            dtype = self.dtype
        return B.from_numpy(a, self.xp, dtype=dtype)

    def np(self, a) -> np.ndarray:
        return B.to_numpy(a)

    def __repr__(self) -> str:
        return f"{self.name}-{self.dtype_name}"


def _make(name: str, dtype_name: str) -> Backend:
    module = importlib.import_module(name)
    return Backend(name, dtype_name, B.namespace_from_module(module), module)


_gpu = [pytest.mark.gpu, pytest.mark.skipif(not _cupy_usable(), reason="cupy with a GPU is not available")]

_ALL = [
    pytest.param(("numpy", "float64"), id="numpy-f64"),
    pytest.param(("numpy", "float32"), id="numpy-f32"),
    pytest.param(("array_api_strict", "float64"), id="strict-f64"),
    pytest.param(("array_api_strict", "float32"), id="strict-f32"),
    pytest.param(("cupy", "float64"), id="cupy-f64", marks=_gpu),
    pytest.param(("cupy", "float32"), id="cupy-f32", marks=_gpu),
]
_F64 = [p for p in _ALL if p.values[0][1] == "float64"]


@pytest.fixture(params=_ALL)
def bk(request) -> Backend:
    return _make(*request.param)


@pytest.fixture(params=_F64)
def bk64(request) -> Backend:
    return _make(*request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20241127)


def separated_problem(rng: np.random.Generator, N: int, K: int, D: int, margin: float = 0.05):
    """Codes far apart and inputs near them, with a guaranteed assignment margin.

    Returns host float64 ``x (N, D)``, ``codebook (K, D)`` and the true ``indices (N,)``: every
    input is closer to its own code than to any other by at least ``margin`` in squared distance.
    """
    codebook = rng.standard_normal((K, D)) * 2.0
    indices = rng.integers(0, K, size=N)
    x = codebook[indices] + 0.1 * rng.standard_normal((N, D))
    d = ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    srt = np.sort(d, axis=1)
    assert np.all(np.argmin(d, axis=1) == indices) and np.all(srt[:, 1] - srt[:, 0] > margin)
    return x, codebook, indices


# Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci`` (default) runs few examples, derandomized, so CI is
# reproducible; ``nightly`` runs many with fresh random draws and the example database.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "nightly"):
    raise ValueError(f"HYPOTHESIS_PROFILE must be 'ci' or 'nightly', got {PROFILE!r}")


def fuzz_settings(ci: int, nightly: int) -> settings:
    """Hypothesis settings with ``ci`` or ``nightly`` examples, by the profile."""
    return settings(
        max_examples=nightly if PROFILE == "nightly" else ci,
        deadline=None,
        derandomize=PROFILE == "ci",
        database=None if PROFILE == "ci" else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


def _clear_rows(x, C, metric):
    """Rows whose best code beats the second best by far more than the scores' rounding error.

    The error of a score is about ``eps * (||x - m||^2 + ||c - m||^2)`` for the centred squared
    distance and ``eps ||x|| ||c||`` for the dot product; two codes closer than a few hundred of
    those may legitimately swap between two orders of summation.
    """
    eps = np.finfo(x.dtype).eps
    x, C = np.asarray(x, np.float64), np.asarray(C, np.float64)
    if metric == "euclidean":
        m = C.mean(0)
        s = ((x[:, None, :] - C[None]) ** 2).sum(-1)
        size = ((x - m) ** 2).sum(1) + ((C - m) ** 2).sum(1).max()
    else:
        s = -(x @ C.T)
        size = np.linalg.norm(x, axis=1) * np.linalg.norm(C, axis=1).max()
    s = np.sort(s, axis=1)
    gap = s[:, 1] - s[:, 0] if s.shape[1] > 1 else np.full(s.shape[0], np.inf)
    return gap > 256 * eps * size


@pytest.fixture
def clear_rows():
    """``clear_rows(x, C, metric)``: the rows whose nearest code no rounding can swap (a bool mask)."""
    return _clear_rows
