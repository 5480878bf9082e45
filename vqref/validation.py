"""Argument checks shared by every public entry point: one clear error per problem.

Each check returns the value in its canonical Python form (``int``, ``float``, ``bool``) or raises
a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) whose message
names the argument, shows what was given, and says what is accepted.  numpy scalars count as the
Python numbers they hold; ``bool`` is not accepted where a number is meant, nor a number where a
flag is meant (``"False"`` is a non-empty string, and would otherwise switch an option on).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import backend as B
from .backend import Array

__all__ = [
    "check_int",
    "check_real",
    "check_bool",
    "check_choice",
    "check_alias",
    "check_seed",
    "check_dtype_name",
    "refuse_masked",
    "as_array",
    "check_float_array",
    "fits",
    "check_fits",
    "check_index_array",
]


def check_int(name: str, value: Array, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (Python or numpy integer, not bool) in ``[minimum, maximum]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_real(name: str, value: Array, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float (Python or numpy real, not bool) in ``[lo, hi]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def check_bool(name: str, value: Array) -> bool:
    """``value`` as a bool: only ``True``/``False`` (or numpy's bools) are flags."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_choice(name: str, value: Array, choices: tuple) -> Array:
    """``value`` if it is one of ``choices`` (compared as strings of the same type)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_alias(name: str, value: Array, alias: str, alias_value: Any, default: Any) -> Array:
    """One value from an option and its alias (e.g. ``codebook_size`` / ``n_embed``)."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and its alias {alias}={alias_value!r} disagree; give one")
    if value is not None:
        return value
    if alias_value is not None:
        return alias_value
    return default


def check_seed(name: str, seed: Any) -> np.random.Generator:
    """A numpy Generator from ``None``, a non-negative int or a Generator."""
    if isinstance(seed, (bool, np.bool_)) or not (
        seed is None or isinstance(seed, (int, np.integer, np.random.Generator))
    ):
        raise TypeError(f"{name} must be None, a non-negative int or a numpy Generator, got {seed!r}")
    if isinstance(seed, (int, np.integer)) and seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed}")
    return B.as_generator(seed)


def check_dtype_name(name: str, dtype: Any) -> str:
    """``"float32"`` or ``"float64"`` from a name, a numpy dtype or an Array API dtype object."""
    if isinstance(dtype, str):
        label = dtype
    elif isinstance(dtype, (np.dtype, type)) and not isinstance(dtype, bool):
        try:
            label = np.dtype(dtype).name
        except TypeError:
            label = repr(dtype)
    else:
        # the dtype objects of other Array API libraries print as "<library>.float32"
        label = str(dtype).rsplit(".", 1)[-1] if dtype is not None else "None"
    if label not in ("float32", "float64"):
        raise ValueError(f"{name} must be float32 or float64 (a name or a dtype), got {dtype!r}")
    return label


def refuse_masked(name: str, a: Any) -> None:
    """Refuse a numpy masked array: the computations would read its hidden values as data."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array, whose mask would be ignored; drop the masked rows or fill "
            f"them ({name}.filled(value)) first"
        )


def as_array(a: Array, name: str, what: str) -> Array:
    """``a`` as an array (lists and numpy subclasses such as np.matrix as plain numpy); no masks."""
    refuse_masked(name, a)
    try:
        return np.asarray(a) if isinstance(a, np.ndarray) or not B.is_array(a) else a
    except (ValueError, TypeError) as e:  # ragged lists
        raise ValueError(f"{name} must be {what} ({e})") from None


def check_float_array(
    name: str,
    a: Array,
    like: Array,
    *,
    shape: tuple | None = None,
    last_dim: int | None = None,
) -> Array:
    """Check that ``a`` is a finite float32/float64 array of ``like``'s library (and shape).

    Parameters
    ----------
    name : how the message calls the argument
    a : the array
    like : an array of the library ``a`` must belong to (the module's state)
    shape : the exact shape, if fixed
    last_dim : the size of the last axis, for inputs of shape ``(..., last_dim)`` with at least
        one vector

    Returns
    -------
    a, unchanged
    """
    if not B.is_array(a):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    lib = B.library_name(a)
    try:
        xp = B.get_namespace(a, like)
    except TypeError:
        raise TypeError(
            f"{name} is a {lib} array but this module holds {B.library_name(like)} arrays; "
            f"move one of them (e.g. module.to({lib}))"
        ) from None
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {a.dtype}")
    if a.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if last_dim is not None:
        if a.ndim < 1 or a.shape[-1] != last_dim:
            raise ValueError(f"{name} must have shape (..., {last_dim}), got {tuple(a.shape)}")
        if B.numel(tuple(a.shape)) == 0:
            raise ValueError(f"{name} is empty (shape {tuple(a.shape)}); at least one vector is needed")
    if not B.all_finite(a):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def fits(a: Any, dtype_name: str) -> bool:
    """True when every value of the array or number ``a`` can be cast to ``dtype_name`` without
    overflowing (a float64 value beyond float32's 3.4e38 becomes an infinity in float32)."""
    if dtype_name != "float32":
        return True
    if B.is_array(a):
        xp = B.get_namespace(a)
        if a.dtype == xp.float32 or B.numel(tuple(a.shape)) == 0:
            return True
        largest = B.to_float(xp.max(xp.abs(a)))
    else:
        largest = abs(float(a))
    return largest <= float(np.finfo(np.float32).max)


def check_fits(
    name: str,
    a: Any,
    dtype_name: str,
    where: str,
    fix: str = "scale the data or build the module with dtype='float64'",
) -> None:
    """Refuse an array or number ``a`` whose values would overflow ``dtype_name`` when cast to it
    (see :func:`fits`); ``where`` says what the value is cast for (``"this module's state"``) and
    ``fix`` how to avoid it, for the message."""
    if not fits(a, dtype_name):
        big = float(np.finfo(np.float32).max)
        raise ValueError(
            f"{name} holds values beyond the float32 range (|value| > {big:.3g}) and {where} is float32; {fix}"
        )


def check_index_array(name: str, indices: Array, like: Array, num_codes: int) -> Array:
    """Check that ``indices`` is an integer array of ``like``'s library with values in [0, K)."""
    if B.is_array(indices) and B.library_name(indices) != B.library_name(like):
        raise TypeError(
            f"{name} is a {B.library_name(indices)} array but this module holds "
            f"{B.library_name(like)} arrays; move one of them"
        )
    xp = B.get_namespace(like)
    if not B.is_array(indices) or not xp.isdtype(indices.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array")
    flat = xp.reshape(indices, (-1,))
    if flat.shape[0] and (int(xp.min(flat)) < 0 or int(xp.max(flat)) >= num_codes):
        raise ValueError(f"{name} must lie in [0, {num_codes})")
    return indices
