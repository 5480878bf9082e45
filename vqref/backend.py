"""The array backend: the only module of vqref that knows which array library it talks to.

Everything else in vqref is written against the Python Array API standard and receives its
namespace ``xp`` from :func:`get_namespace`.  numpy runs it on the CPU, cupy on a GPU, and
``array_api_strict`` (in the tests) proves that nothing outside the standard is used.

What lives here:

* namespace and device lookup, with a clear ``TypeError`` for mixed libraries;
* moving data between the host (numpy) and any namespace: :func:`to_numpy`, :func:`from_numpy`;
* host-side random sampling from a ``numpy.random.Generator``, so that the same seed gives the
  same numbers on every backend (the samples are moved to the array's device afterwards);
* the few primitives the standard lacks, each with a fast path per library and a portable
  fallback: :func:`segment_sum` (scatter-add of rows by index) and :func:`bincount`.

Symbols: N rows, D features, K segments (codes).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
import array_api_compat

__all__ = [
    "get_namespace",
    "namespace_from_module",
    "get_device",
    "library_name",
    "is_numpy",
    "is_cupy",
    "to_numpy",
    "from_numpy",
    "as_generator",
    "segment_sum",
    "bincount",
    "is_float_array",
    "all_finite",
    "to_float",
]


def _is_array(x: Any) -> bool:
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def library_name(x: Any) -> str:
    """A short name of the library that owns array ``x`` ("numpy", "cupy", "array_api_strict", ...)."""
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    return type(x).__module__.split(".")[0]


def get_namespace(*arrays: Any) -> ModuleType:
    """The Array API namespace shared by ``arrays`` (``None`` and Python scalars are ignored).

    Raises
    ------
    TypeError
        If the arrays come from different libraries (e.g. numpy and cupy), or if none is an array.
    """
    arrs = [a for a in arrays if a is not None and _is_array(a)]
    if not arrs:
        raise TypeError("expected at least one array, got none (lists and scalars are not arrays)")
    names = {library_name(a) for a in arrs}
    if len(names) > 1:
        raise TypeError(
            "arrays from different libraries were mixed: "
            + ", ".join(sorted(names))
            + "; convert them to one library first (vqref.backend.to_numpy / from_numpy)"
        )
    return array_api_compat.array_namespace(*arrs)


def namespace_from_module(module: Any) -> ModuleType:
    """The Array API namespace for a library given as a module (``numpy``, ``cupy``, ...) or name."""
    if module is None:
        module = np
    if isinstance(module, str):
        import importlib

        module = importlib.import_module(module)
    probe = module.asarray([0.0])
    return array_api_compat.array_namespace(probe)


def get_device(x: Any) -> Any:
    """The device of array ``x`` (``"cpu"`` for numpy)."""
    return array_api_compat.device(x)


def is_numpy(xp: ModuleType) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy(xp: ModuleType) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def to_numpy(x: Any) -> np.ndarray:
    """Copy (or view) an array of any supported library as a numpy array on the host."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except Exception:  # pragma: no cover - libraries without a CPU dlpack export
        return np.asarray(x)


def from_numpy(a: Any, xp: ModuleType, *, device: Any = None, dtype: Any = None) -> Any:
    """Move host data ``a`` into namespace ``xp`` (on ``device``), optionally casting to ``dtype``."""
    a = np.asarray(a)
    out = xp.asarray(a, device=device) if device is not None else xp.asarray(a)
    if dtype is not None and out.dtype != dtype:
        out = xp.astype(out, dtype)
    return out


def as_generator(seed: Any) -> np.random.Generator:
    """A host ``numpy.random.Generator`` from a seed, or the generator itself.  Never global state."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def is_float_array(x: Any) -> bool:
    xp = get_namespace(x)
    return xp.isdtype(x.dtype, "real floating")


def all_finite(x: Any) -> bool:
    """True when every element is finite.  Synchronises with the device: call from drivers only."""
    xp = get_namespace(x)
    return bool(xp.all(xp.isfinite(x)))


def to_float(x: Any) -> float:
    """A Python float from a 0-d array (a host-device sync: drivers only, never inside ops)."""
    return float(to_numpy(x))


# --------------------------------------------------------------------------------------------
# Primitives the Array API standard lacks
# --------------------------------------------------------------------------------------------

# The portable fallbacks build an (chunk, K) one-hot block; this bounds its number of elements.
_ONEHOT_BLOCK_ELEMENTS = 1 << 22


def segment_sum(values: Any, ids: Any, num_segments: int) -> Any:
    """Sum the rows of ``values`` that share an id: ``out[k] = sum_{i : ids[i] = k} values[i]``.

    This is the adjoint of the gather ``values = table[ids]`` and the statistic of a k-means or
    EMA step.  It is never ``out[ids] += values``: fancy-index assignment keeps only one of the
    repeated indices in numpy and is undefined in cupy.

    Parameters
    ----------
    values : (N, D) float or (N,) float
    ids : (N,) integer, each in ``[0, num_segments)``
    num_segments : int, K

    Returns
    -------
    out : (K, D) or (K,), the dtype of ``values``

    Notes
    -----
    numpy: sort by id once, then ``np.add.reduceat`` over the sorted rows (faster than
    ``np.add.at``).  cupy: ``cupy.add.at`` (atomic adds).  Anything else: a one-hot
    matrix product ``onehot(ids, K).T @ values`` computed in blocks of rows, so memory stays
    bounded.  The three agree to rounding (the order of the additions differs).
    """
    xp = get_namespace(values, ids)
    K = int(num_segments)
    squeeze = values.ndim == 1
    if squeeze:
        values = xp.reshape(values, (values.shape[0], 1))
    N, D = values.shape
    if is_numpy(xp):
        out = np.zeros((K, D), dtype=values.dtype)
        if N:
            ids_np = np.asarray(ids)
            order = np.argsort(ids_np, kind="stable")
            sorted_ids = ids_np[order]
            starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
            out[sorted_ids[starts]] = np.add.reduceat(np.asarray(values)[order], starts, axis=0)
    elif is_cupy(xp):
        out = xp.zeros((K, D), dtype=values.dtype)
        import cupy

        cupy.add.at(out, ids, values)  # atomic adds: exact sums, order not deterministic
    else:
        dev = get_device(values)
        out = xp.zeros((K, D), dtype=values.dtype, device=dev)
        codes = xp.arange(K, dtype=ids.dtype, device=dev)
        step = max(1, _ONEHOT_BLOCK_ELEMENTS // max(K, 1))
        for start in range(0, N, step):
            stop = min(start + step, N)
            blk = ids[start:stop]
            onehot = xp.astype(blk[:, None] == codes[None, :], values.dtype)  # (n, K)
            out = out + onehot.mT @ values[start:stop, :]  # (K, D)
    return out[:, 0] if squeeze else out


def bincount(ids: Any, num_segments: int, dtype: Any = None) -> Any:
    """How many times each id in ``[0, num_segments)`` occurs: ``(K,)`` in ``dtype`` (default int64)."""
    xp = get_namespace(ids)
    K = int(num_segments)
    if dtype is None:
        dtype = xp.int64
    if is_numpy(xp) or is_cupy(xp):
        counts = xp.bincount(ids, minlength=K)
        return xp.astype(counts, dtype) if counts.dtype != dtype else counts
    dev = get_device(ids)
    out = xp.zeros((K,), dtype=xp.int64, device=dev)
    codes = xp.arange(K, dtype=ids.dtype, device=dev)
    step = max(1, _ONEHOT_BLOCK_ELEMENTS // max(K, 1))
    n = ids.shape[0]
    for start in range(0, n, step):
        blk = ids[start : min(start + step, n)]
        out = out + xp.sum(xp.astype(blk[:, None] == codes[None, :], xp.int64), axis=0)
    return xp.astype(out, dtype) if dtype != xp.int64 else out


def numel(shape: tuple) -> int:
    """Number of elements of a shape tuple."""
    return int(math.prod(shape))
