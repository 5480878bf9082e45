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
  fallback: :func:`segment_sum` (scatter-add of rows by index), :func:`bincount` and
  :func:`where_rows` (compute a row-wise function only on the rows that need it).

The numpy fast paths exist for speed alone (``docs/performance.md``); ``tests/test_fast_paths.py``
checks each one against its portable fallback.

Symbols: N rows, D features, K segments (codes).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from . import threads

# The type of an array of any supported library (numpy.ndarray, cupy.ndarray, array_api_strict's
# Array, ...).  The Array API standard defines no common base class, so annotations use this alias
# of Any: it says "an array of the module's library" where plain Any would say nothing.
Array = Any

__all__ = [
    "Array",
    "get_namespace",
    "namespace_from_module",
    "get_device",
    "library_name",
    "is_numpy",
    "is_cupy",
    "to_numpy",
    "from_numpy",
    "as_generator",
    "clone_generator",
    "is_array",
    "KNOWN_LIBRARIES",
    "segment_sum",
    "bincount",
    "where_rows",
    "rows_per_block",
    "for_row_blocks",
    "difference",
    "copied",
    "quotient",
    "add_into",
    "is_float_array",
    "all_finite",
    "to_float",
]


def is_array(x: Array) -> bool:
    """True for an array of an Array API library (numpy, cupy, array_api_strict, ...), False for
    Python scalars, lists and anything else."""
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def library_name(x: Array) -> str:
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
    arrs = [a for a in arrays if a is not None and is_array(a)]
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


# The array libraries vqref runs on, by the name a caller may give instead of the module.  A name
# outside this list is refused: a library is never imported from an arbitrary string.
KNOWN_LIBRARIES = ("numpy", "cupy", "array_api_strict")


def namespace_from_module(module: Any) -> ModuleType:
    """The Array API namespace for a library given as a module (``numpy``, ``cupy``,
    ``array_api_strict``) or as one of those names; ``None`` is numpy.

    Raises
    ------
    TypeError : ``module`` is neither a module nor a string
    ValueError : a name outside :data:`KNOWN_LIBRARIES`, a known library that is not installed, or
        a module that is not an array library
    """
    if module is None:
        module = np
    if isinstance(module, str):
        if module not in KNOWN_LIBRARIES:
            raise ValueError(f"xp must be one of the array libraries {KNOWN_LIBRARIES} (or the module), got {module!r}")
        import importlib

        try:
            module = importlib.import_module(module)
        except ImportError as e:  # a known library that is not installed here (cupy on a CPU machine)
            raise ValueError(f"xp={module!r} is not available here: {e}") from None
    if not isinstance(module, ModuleType):
        raise TypeError(f"xp must be an array library module (numpy, cupy, array_api_strict), got {module!r}")
    try:
        probe = module.asarray([0.0])
        return array_api_compat.array_namespace(probe)
    except Exception:
        raise ValueError(f"xp={module.__name__!r} is not an array library vqref can use") from None


def get_device(x: Array) -> Array:
    """The device of array ``x`` (``"cpu"`` for numpy)."""
    return array_api_compat.device(x)


def is_numpy(xp: ModuleType) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy(xp: ModuleType) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def to_numpy(x: Array) -> np.ndarray:
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


def from_numpy(a: Array, xp: ModuleType, *, device: Any = None, dtype: Any = None) -> Array:
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


def clone_generator(gen: np.random.Generator) -> np.random.Generator:
    """An independent copy of ``gen`` in the same state: drawing from it leaves ``gen`` as it is."""
    bit_generator = type(gen.bit_generator)()
    bit_generator.state = gen.bit_generator.state
    return np.random.Generator(bit_generator)


def is_float_array(x: Array) -> bool:
    xp = get_namespace(x)
    return xp.isdtype(x.dtype, "real floating")


def all_finite(x: Array) -> bool:
    """True when every element is finite.  Synchronises with the device: call from drivers only.

    numpy fast path (:func:`_sums_are_finite`): sums over the data instead of a boolean array of
    x's size.  A NaN or an infinity makes a sum non-finite; only when a sum is not finite (which
    finite data can also give, by overflow) is every element checked.
    """
    xp = get_namespace(x)
    if is_numpy(xp) and xp.isdtype(x.dtype, "real floating") and _sums_are_finite(x):
        return True
    return bool(xp.all(xp.isfinite(x)))


_FINITE_BLOCK = 1 << 18  # elements per sum of :func:`_sums_are_finite` (1 MiB in float32)


def _sums_are_finite(x: np.ndarray) -> bool:
    """True when the sums of consecutive blocks of a numpy float array are all finite, which
    implies every element is; False says nothing (a sum of finite numbers may overflow).

    A contiguous array's blocks of :data:`_FINITE_BLOCK` elements are summed on the worker threads
    (:func:`vqref.threads.for_blocks`); any other array in one sum."""
    with np.errstate(over="ignore", invalid="ignore"):  # large finite data may overflow a sum (workers too)
        if not x.flags.c_contiguous or x.size <= _FINITE_BLOCK:
            return bool(np.isfinite(np.sum(x)))
        flat = x.reshape(-1)  # a view
        finite = [True] * -(-flat.shape[0] // _FINITE_BLOCK)  # one flag per block

        def block(i: int, j: int) -> None:
            finite[i // _FINITE_BLOCK] = bool(np.isfinite(np.sum(flat[i:j])))

        threads.for_blocks(flat.shape[0], _FINITE_BLOCK, block)  # the workers run in this errstate
        return all(finite)


def to_float(x: Array) -> float:
    """A Python float from a 0-d array (a host-device sync: drivers only, never inside ops)."""
    return float(to_numpy(x))


# --------------------------------------------------------------------------------------------
# Primitives the Array API standard lacks
# --------------------------------------------------------------------------------------------

# The portable fallbacks build an (chunk, K) one-hot block; this bounds its number of elements.
_ONEHOT_BLOCK_ELEMENTS = 1 << 22


def segment_sum(values: Array, ids: Array, num_segments: int, *, offsets: Any = None) -> Array:
    """Sum the rows of ``values`` that share an id: ``out[k] = sum_{i : ids[i] = k} values[i]``.

    This is the adjoint of the gather ``values = table[ids]`` and the statistic of a k-means or
    EMA step.  It is never ``out[ids] += values``: fancy-index assignment keeps only one of the
    repeated indices in numpy and is undefined in cupy.

    Parameters
    ----------
    values : (N, D) float or (N,) float
    ids : (N,) integer, each in ``[0, num_segments)``
    num_segments : int, K
    offsets : optional (K, D) or (K,) float: sum the deviations ``values[i] - offsets[k]``
        instead, ``out[k] = sum_{i : ids[i] = k} (values[i] - offsets[k])``.  Equal to
        ``segment_sum(values - take(offsets, ids))``, without the two (N, D) temporaries on numpy.

    Returns
    -------
    out : (K, D) or (K,), the dtype of ``values``

    Notes
    -----
    numpy: :func:`_segment_sum_numpy` (a stable counting sort of the ids, then one reduction per
    code).  cupy and anything else: a one-hot matrix product ``onehot(ids, K).T @ values``
    computed in blocks of rows, so memory stays bounded; on cupy it is preferred to atomic
    scatter-adds because it is bit-reproducible.  The paths agree to rounding (the order of the
    additions differs).
    """
    xp = get_namespace(values, ids)
    K = int(num_segments)
    squeeze = values.ndim == 1
    if squeeze:
        values = xp.reshape(values, (values.shape[0], 1))
        if offsets is not None:
            offsets = xp.reshape(offsets, (offsets.shape[0], 1))
    N, D = values.shape
    if is_numpy(xp):
        off = None if offsets is None else np.asarray(offsets)
        out = _segment_sum_numpy(np.asarray(values), np.asarray(ids), K, off)
        return out[:, 0] if squeeze else out
    if offsets is not None:
        values = values - xp.take(offsets, ids, axis=0)  # (N, D) deviations
    # cupy takes the one-hot product below too: its scatter-add (``cupy.add.at``) uses atomic
    # adds, whose order -- and so the float rounding -- changes from run to run, while a matrix
    # product is bit-reproducible, so a seed gives bit-identical results on the GPU as well.
    dev = get_device(values)
    out = xp.zeros((K, D), dtype=values.dtype, device=dev)
    codes = xp.arange(K, dtype=ids.dtype, device=dev)
    step = max(1, _ONEHOT_BLOCK_ELEMENTS // max(K, 1))
    for start in range(0, N, step):
        stop = min(start + step, N)
        onehot = xp.astype(ids[start:stop, None] == codes[None, :], values.dtype)  # (n, K)
        out = out + onehot.mT @ values[start:stop, :]  # (K, D)
    return out[:, 0] if squeeze else out


# Below this many summed elements per segment, one reduceat beats a Python loop over segments.
_ROWS_LOOP_MIN_ELEMENTS = 256


def _segment_sum_numpy(values: np.ndarray, ids: np.ndarray, K: int, offsets: Any = None) -> np.ndarray:
    """numpy fast path of :func:`segment_sum`: sort once, then sum each segment's rows.

    The ids are sorted by a stable radix sort (numpy uses one for 8- and 16-bit keys, so the ids
    are narrowed first when K allows), which keeps the rows of a segment in their original
    order.  ``np.add.reduceat`` over axis 0 would then do the sums in one call, but it walks
    the (N, D) array column by column; a loop over the non-empty segments that gathers each
    segment's rows into a small block and reduces it is about five times faster for D >= 16,
    and touches every row once.  Tiny segments (fewer summed elements than
    ``_ROWS_LOOP_MIN_ELEMENTS`` on average) still use ``reduceat``.  ``offsets`` (K, D), if
    given, is subtracted from each segment's block before its sum.
    """
    N, D = values.shape
    out = np.zeros((K, D), dtype=values.dtype)
    if N == 0:
        return out
    key = ids
    for narrow in (np.uint8, np.uint16):
        if K <= np.iinfo(narrow).max + 1:
            key = ids.astype(narrow)
            break
    order = np.argsort(key, kind="stable")  # (N,) rows grouped by id, original order within
    counts = np.bincount(ids, minlength=K)  # (K,)
    present = np.flatnonzero(counts)  # the non-empty segments, ascending
    ends = np.cumsum(counts[present])  # (S,) end of each segment in sorted order
    if N * D < _ROWS_LOOP_MIN_ELEMENTS * present.size:
        starts = ends - counts[present]
        rows = np.take(values, order, axis=0)  # (N, D) sorted by id
        if offsets is not None:
            rows = rows - np.take(offsets, ids[order], axis=0)
        out[present] = np.add.reduceat(rows, starts, axis=0)
        return out
    start = 0
    for k, stop in zip(present.tolist(), ends.tolist()):
        block = np.take(values, order[start:stop], axis=0)  # (n_k, D), small: stays in cache
        if offsets is not None:
            block -= offsets[k]
        np.add.reduce(block, axis=0, out=out[k])
        start = stop
    return out


def bincount(ids: Array, num_segments: int, dtype: Any = None) -> Array:
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


def where_rows(mask: Array, fn: Any, arrays: tuple, default: Any) -> Array:
    """``where(mask, fn(*arrays), default)`` for a row-wise ``fn``, evaluated only where needed.

    ``fn`` must compute each output row from the same rows of its inputs (row i of the result
    depends on row i of every array only), so that evaluating it on a subset of rows gives
    those rows of the full result.  This is how an op keeps a slow, careful formula for the
    rare rows that need it (near-degenerate geometry, extreme magnitudes) and a fast one for
    the rest, without branching on the host.

    Parameters
    ----------
    mask : (N,) or (N, 1) bool, the rows that take ``fn``'s value
    fn : callable, ``fn(*row_subsets) -> (n, ...)``
    arrays : tuple of (N, ...) arrays, fn's inputs
    default : (N, ...) array, the value of the other rows (numpy: may be overwritten in place
        and returned, so pass an array the caller owns)

    Returns
    -------
    (N, ...) array

    Notes
    -----
    numpy: ``fn`` runs on the selected rows only (a host-side boolean selection; numpy has no
    device to wait for), and those rows of ``default`` are overwritten.  Other libraries:
    ``fn`` runs on every row and ``xp.where`` picks, which keeps cupy free of host-device
    synchronisation (a boolean selection has a data-dependent size).  ``fn`` must therefore
    stay finite (or at least harmless) on rows it is not meant for.
    """
    xp = get_namespace(mask, default)
    if is_numpy(xp):
        rows = np.flatnonzero(np.asarray(mask).reshape(-1))
        if rows.size == 0:
            return default
        if rows.size == default.shape[0]:
            return fn(*arrays)
        default[rows] = fn(*(np.take(a, rows, axis=0) for a in arrays))
        return default
    m = mask if mask.ndim == default.ndim else xp.reshape(mask, (mask.shape[0],) + (1,) * (default.ndim - 1))
    return xp.where(m, fn(*arrays), default)


def rows_per_block(x: Array, elements: int) -> int:
    """Rows of the 2-D array ``x`` to process at once in a chain of elementwise operations.

    On the CPU a chain like ``s * g + a * e + b * q`` allocates and streams one (N, D) array
    per operation; done on blocks of about ``elements`` elements, the intermediates stay in
    cache and only the inputs and the result go through memory.  A GPU wants the opposite:
    every row at once, one kernel launch per operation.  So: cache-sized blocks everywhere
    except cupy, where the block is the whole array.
    """
    N = int(x.shape[0])
    if is_cupy(get_namespace(x)):
        return max(N, 1)
    row = int(math.prod(tuple(x.shape[1:])))
    return max(1, int(elements) // max(row, 1))


def for_row_blocks(x: Array, step: int, fn: Any) -> None:
    """Call ``fn(start, stop)`` for the consecutive blocks of ``step`` rows of ``x``.

    numpy: the blocks are split between worker threads (:func:`vqref.threads.for_blocks`, as
    many as numpy's BLAS has threads), so a blocked elementwise pass uses every core; ``fn`` must
    write only rows ``start:stop`` of its outputs.  Every other library: in order (on cupy
    :func:`rows_per_block` makes the whole array one block).
    """
    N = int(x.shape[0])
    if is_numpy(get_namespace(x)):
        threads.for_blocks(N, step, fn)
        return
    for start in range(0, N, max(1, int(step))):
        fn(start, min(start + step, N))


# elements per block of the elementwise passes below (1 MiB in float32: cache-sized)
_PASS_ELEMENTS = 1 << 18


def _rows_on_workers(op: Any, out: np.ndarray, *args: np.ndarray) -> np.ndarray:
    """``op(*args, out=out)`` for numpy (N, ...) arrays, block of rows by block of rows on the worker
    threads of :func:`for_row_blocks`: an elementwise ``op`` gives the same numbers bit for bit."""
    for_row_blocks(out, rows_per_block(out, _PASS_ELEMENTS), lambda i, j: op(*(a[i:j] for a in args), out=out[i:j]))
    return out


def _same_2d(a: Array, b: Array) -> bool:
    """numpy (N, D) arrays of one shape and dtype, N > 0: the passes below may take the workers."""
    return (
        is_numpy(get_namespace(a, b)) and a.ndim == 2 and a.shape == b.shape and a.dtype == b.dtype and a.shape[0] > 0
    )


def difference(a: Array, b: Array) -> Array:
    """``a - b``, a new array; for two numpy (N, D) arrays of one shape and dtype on worker threads."""
    return _rows_on_workers(np.subtract, np.empty(a.shape, dtype=a.dtype), a, b) if _same_2d(a, b) else a - b


def copied(a: Array) -> Array:
    """A copy of ``a`` (a new array); for a numpy (N, D) array on worker threads, else ``asarray(a, copy=True)``."""
    if not _same_2d(a, a):
        return get_namespace(a).asarray(a, copy=True)
    return _rows_on_workers(lambda src, out: np.copyto(out, src), np.empty(a.shape, dtype=a.dtype), a)


def quotient(x: Array, scale: Array) -> Array:
    """``x / scale`` for (N, D) x and a (N, 1) column of row scales, a new array; for numpy arrays of
    one dtype on worker threads, else the plain expression."""
    xp = get_namespace(x, scale)
    if not (is_numpy(xp) and x.ndim == 2 and scale.shape == (x.shape[0], 1) and x.dtype == scale.dtype):
        return x / scale
    return _rows_on_workers(np.divide, np.empty(x.shape, dtype=x.dtype), x, scale)


def add_into(total: Array, term: Array) -> Array:
    """``total += term`` in place (``total``: a buffer the caller owns), returned; for numpy (N, D)
    arrays of one shape and dtype on worker threads."""
    if not _same_2d(total, term):
        total += term
        return total
    return _rows_on_workers(np.add, total, total, term)


def numel(shape: tuple) -> int:
    """Number of elements of a shape tuple."""
    return int(math.prod(shape))
