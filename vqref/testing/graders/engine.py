"""The grading machinery shared by every exercise: run a learner's function, compare, explain.

Symbols: N vectors, D features, K codes (each exercise names its own sizes; the messages use
them, so that a shape ``(5, 7)`` reads as ``(D, K)`` when the expected one was ``(K, D)``).

How a grade is decided
----------------------
1. *Cases.*  Each exercise draws a few problems from a seeded ``numpy.random.Generator``, with
   distinct sizes (N != K != D), so that a transposed result is a wrong shape rather than a
   plausible number.  Float inputs are rounded to the requested dtype *before* the oracle sees
   them, so the float64 oracle and a float32 function work on the same numbers.
2. *Oracle.*  An answer computed independently of the exercise's solution and of vqref's own
   ops: float64 finite differences of a forward written in the grader (true derivatives, with
   the codes held fixed), torch autograd with ``.detach()`` where the math has a stop-gradient
   (surrogate gradients), or a plain loop (the EMA step, which is not a gradient).
3. *Call.*  The function receives fresh arrays of the requested library and dtype.
   ``NotImplementedError`` means "not implemented yet"; any other exception is reported with the
   shapes of the inputs; a function that changes an input in place fails.
4. *Checks*, in order: number of outputs, each an array of the inputs' library, its shape, its
   values (norm-wise relative error at most ``RTOL[dtype]``), finiteness, and finally its dtype
   (a float32 problem must give float32 answers).
5. *Diagnosis.*  When an answer is wrong, it is compared (to ``MATCH_RTOL``) with every *known
   mistake* of the exercise, each computed on the same inputs (a missing sum over repeated rows,
   a transpose, a sign, a gradient through a stop-gradient, ...).  The first mistake it matches
   gives the message.  Otherwise the message says which outputs are off and by how much, and
   lists the usual suspects.

The cases, the oracle's answers and the mistakes' answers depend only on the exercise, the seed
and the dtype; they are computed once per process and reused (learners re-run graders often).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ... import backend as B
from ..gradcheck import numerical_vjp, rel_error

__all__ = [
    "RTOL",
    "Case",
    "Output",
    "Mistake",
    "Exercise",
    "GradeResult",
    "grade_function",
    "load_function",
    "find_exercise_folder",
    "fd_vjp",
    "torch_module",
    "segment_sum",
]

# Largest accepted norm-wise relative error, by the dtype the function computes in.  float64:
# the finite-difference oracle itself is good to about 1e-9.  float32: rounding alone is ~1e-7
# per operation, and a few hundred of them add up.
RTOL = {"float64": 1e-6, "float32": 1e-4}
# An answer counts as a known mistake when it is that mistake to this relative error: looser than
# RTOL, because a learner writes the same slip in other ways (another order of operations, an
# unclamped logarithm) whose side effects are small next to the slip itself.
MATCH_RTOL = 1e-4


class Case(NamedTuple):
    """One problem: the function's positional inputs (host values) and the sizes, for messages."""

    label: str  # e.g. "N=11, K=7, D=5"
    inputs: dict  # name -> numpy float64/int64 array, or a Python value passed unchanged
    sizes: dict  # symbol -> int, e.g. {"N": 11, "K": 7, "D": 5}


@dataclass(frozen=True)
class Output:
    name: str  # e.g. "dcodebook"
    dims: tuple  # symbols of its shape, e.g. ("K", "D"); resolved with Case.sizes


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong answer: ``answer(inputs)`` gives its outputs (host float64) on a case."""

    hint: str
    answer: Callable[[dict], tuple]


@dataclass(frozen=True)
class Exercise:
    key: str  # "ex01"
    function: str  # the name of the function the learner writes
    stem: str  # the file name without ".py", in exercises/ and exercises/solutions/
    title: str
    oracle: str  # what the answers are checked against, in words
    outputs: tuple  # Output, one per returned array, in order
    cases: Callable[[np.random.Generator], list]  # rng -> list of Case
    expected: Callable[[dict], tuple]  # the oracle: inputs -> host float64 outputs
    mistakes: tuple = ()  # Mistake, tried in order
    suspects: str = ""  # said when no known mistake matches
    nonfinite: str = ""  # said when an answer holds NaN or inf (where such values usually come from)
    extra_check: Callable | None = None  # (fn, xp, dtype_name) -> message or None (e.g. memory)


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one function.  ``bool(result)`` is ``result.passed``."""

    exercise: str  # "ex01"
    title: str
    passed: bool
    message: str
    max_error: float = field(default=math.nan)  # over the cases that were compared

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.exercise} {self.title}: {self.message}"


# --------------------------------------------------------------------------------------------
# Helpers for the exercise definitions
# --------------------------------------------------------------------------------------------


def fd_vjp(f: Callable, inputs: Sequence[np.ndarray], dout: Any, *, wrt: Sequence[int], h: float = 1e-6) -> list:
    """Central-difference VJP of ``f`` (host float64), a thin wrapper of :func:`numerical_vjp`."""
    arrays = [np.array(a, dtype=np.float64) for a in inputs]
    return numerical_vjp(f, arrays, np.asarray(dout, dtype=np.float64), h=h, wrt=wrt)


def torch_module():
    """``torch``, or an error that says how to install it (the autograd oracles need it)."""
    try:
        import torch
    except ImportError:
        raise ModuleNotFoundError(
            "this grader's oracle is torch autograd, and torch is not installed: "
            "pip install 'vqref[torch]' (a CPU build is enough)"
        ) from None
    return torch


def segment_sum(values: np.ndarray, ids: np.ndarray, K: int) -> np.ndarray:
    """Host ``out[k] = sum_{i: ids[i] = k} values[i]``, for writing mistakes and loop oracles."""
    out = np.zeros((K,) + values.shape[1:])
    np.add.at(out, ids, values)
    return out


# --------------------------------------------------------------------------------------------
# Cases, oracle answers and mistakes' answers, computed once per (exercise, seed, dtype)
# --------------------------------------------------------------------------------------------

_PREPARED: dict = {}


def _round(value: Any, dtype_name: str) -> Any:
    """Float arrays rounded to ``dtype_name`` and back to float64; other values unchanged."""
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value.astype(dtype_name).astype(np.float64)
    return value


def _prepared(ex: Exercise, seed: int, dtype_name: str) -> list:
    key = (ex.key, seed, dtype_name)
    if key not in _PREPARED:
        rows = []
        for case in ex.cases(np.random.default_rng(seed)):
            case = case._replace(inputs={k: _round(v, dtype_name) for k, v in case.inputs.items()})
            expected = tuple(np.asarray(a, dtype=np.float64) for a in ex.expected(case.inputs))
            wrong = [tuple(np.asarray(a, dtype=np.float64) for a in m.answer(case.inputs)) for m in ex.mistakes]
            rows.append((case, expected, wrong))
        _PREPARED[key] = rows
    return _PREPARED[key]


def prepared_cases(ex: Exercise, *, seed: int = 0, dtype_name: str = "float64") -> list:
    """``[(case, expected, [mistake answers])]`` as the grader uses them (for tests and notebooks)."""
    return _prepared(ex, seed, dtype_name)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _named_shape(shape: tuple, sizes: dict) -> str:
    """``(5, 7)`` as ``(D, K) = (5, 7)`` where each size names exactly one symbol."""
    names = []
    for n in shape:
        match = [s for s, v in sizes.items() if v == n]
        names.append(match[0] if len(match) == 1 else str(n))
    text = "(" + ", ".join(names) + ("," if len(shape) == 1 else "") + ")"
    return text + f" = {tuple(shape)}" if any(not n.isdigit() for n in names) else str(tuple(shape))


def _describe_inputs(case: Case) -> str:
    parts = []
    for name, v in case.inputs.items():
        if isinstance(v, np.ndarray):
            parts.append(f"{name} {tuple(v.shape)} {'int' if np.issubdtype(v.dtype, np.integer) else 'float'}")
        else:
            parts.append(f"{name}={v!r}")
    return ", ".join(parts) + f" (sizes {', '.join(f'{k}={v}' for k, v in case.sizes.items())})"


def _shape_message(spec: Output, got: tuple, want: tuple, sizes: dict) -> str:
    text = f"{spec.name} has shape {_named_shape(got, sizes)}, expected {_named_shape(want, sizes)}"
    if len(got) == len(want) == 2 and tuple(got) == tuple(reversed(want)) and got != want:
        text += ": it looks transposed"
    elif sorted(got) == sorted(want) and got != want:
        text += ": the right sizes in the wrong order (a transpose or a reshape that mixed up axes?)"
    return text


def _matches(got: list, answer: tuple, expected: tuple, rtol: float) -> bool:
    """``got`` is ``answer`` (a known mistake) to ``max(rtol, MATCH_RTOL)``, and that mistake is,
    on this case, clearly apart from the right answer (ten times the matching tolerance)."""
    if len(answer) != len(got) or any(g.shape != a.shape for g, a in zip(got, answer)):
        return False
    tol = max(rtol, MATCH_RTOL)
    apart = any(a.shape != e.shape or rel_error(a, e) > 10 * tol for a, e in zip(answer, expected))
    with np.errstate(invalid="ignore"):
        return apart and all(np.all(np.isfinite(g)) and rel_error(g, a) <= tol for g, a in zip(got, answer))


# --------------------------------------------------------------------------------------------
# Loading and grading
# --------------------------------------------------------------------------------------------


def find_exercise_folder(directory: Any = None) -> Path:
    """The ``exercises/`` folder: ``directory`` if given, else ``./exercises``, else the current
    folder if it holds the exercise files, else the one beside an editable vqref checkout."""
    if directory is not None:
        folder = Path(directory)
        if not folder.is_dir():
            raise FileNotFoundError(f"directory={str(directory)!r} is not a folder; pass the exercises/ folder")
        return folder
    here = Path.cwd()
    candidates = [here / "exercises", here, Path(__file__).resolve().parents[3] / "exercises"]
    for folder in candidates:
        if (folder / "solutions").is_dir() and any(folder.glob("ex[0-9][0-9]_*.py")):
            return folder
    raise FileNotFoundError(
        "no exercises/ folder found (looked in " + ", ".join(str(c) for c in candidates) + "); "
        "run from the repository root, or pass its path (grade(..., directory=...), vqref grade --dir PATH)"
    )


def load_function(ex: Exercise, directory: Any = None, *, solution: bool = False) -> Callable:
    """Import ``exercises/<stem>.py`` (or ``solutions/<stem>.py``) afresh and return the function.

    The file is executed anew at every call, so edits are picked up without restarting Python.
    """
    folder = find_exercise_folder(directory)
    path = (folder / "solutions" if solution else folder) / f"{ex.stem}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; exercise {ex.key} lives in {ex.stem}.py")
    spec = importlib.util.spec_from_file_location(f"vqref_exercise_{ex.stem}{'_solution' if solution else ''}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, ex.function, None)
    if not callable(fn):
        raise AttributeError(f"{path} defines no function {ex.function}(); keep the name the stub gives")
    return fn


def _to_library(inputs: dict, xp: Any, dtype_name: str) -> list:
    """Fresh arrays of ``xp`` for the array inputs (floats in ``dtype_name``, integers int64)."""
    args = []
    for v in inputs.values():
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            args.append(B.from_numpy(np.array(v, dtype=dtype_name), xp, dtype=getattr(xp, dtype_name)))
        elif isinstance(v, np.ndarray):
            args.append(B.from_numpy(np.array(v, dtype=np.int64), xp, dtype=xp.int64))
        else:
            args.append(v)
    return args


def grade_function(
    ex: Exercise, fn: Callable, *, backend: Any = "numpy", dtype: str = "float64", seed: int = 0
) -> GradeResult:
    """Grade ``fn`` on exercise ``ex`` (see the module notes for the steps)."""
    if dtype not in RTOL:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if not callable(fn):
        raise TypeError(f"fn must be the function to grade, got {type(fn).__name__}")
    xp = B.namespace_from_module(backend)
    library = B.library_name(xp.asarray([0.0]))
    rtol = RTOL[dtype]

    def fail(message: str, worst: float = math.nan) -> GradeResult:
        return GradeResult(ex.key, ex.title, False, message, worst)

    rows = _prepared(ex, seed, dtype)
    worst = 0.0
    for n, (case, expected, wrong) in enumerate(rows):
        where = f"case {n + 1} of {len(rows)} ({case.label})"
        args = _to_library(case.inputs, xp, dtype)
        try:
            with np.errstate(all="ignore"):
                got = fn(*args)
        except NotImplementedError:
            return fail(
                f"not implemented yet: open exercises/{ex.stem}.py, read its docstring, and replace "
                f"`raise NotImplementedError` in {ex.function}() by your code"
            )
        except Exception as err:  # the learner's bug, reported with what the function was given
            return fail(
                f"{where}: {ex.function}() raised {type(err).__name__}: {err}. Its inputs: {_describe_inputs(case)}"
            )
        changed = [
            name
            for (name, v), a in zip(case.inputs.items(), args)
            if isinstance(v, np.ndarray) and not np.array_equal(B.to_numpy(a).astype(np.float64), v, equal_nan=True)
        ]
        if changed:
            return fail(
                f"{where}: {ex.function}() changed its input {', '.join(changed)} in place; "
                "a backward must leave its inputs alone (write into new arrays, e.g. x = x + y, not x += y)"
            )
        if got is None:
            return fail(f"{where}: {ex.function}() returned None (a missing `return`?)")
        outs = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        names = ", ".join(o.name for o in ex.outputs)
        if len(outs) != len(ex.outputs):
            return fail(f"{where}: {ex.function}() returned {len(outs)} value(s), expected {len(ex.outputs)}: {names}")
        for spec, o in zip(ex.outputs, outs):
            if not B.is_array(o) or B.library_name(o) != library:
                kind = B.library_name(o) + " array" if B.is_array(o) else type(o).__name__
                return fail(
                    f"{where}: {spec.name} is a {kind}, expected a {library} array like the inputs "
                    "(compute with the inputs' namespace: xp = array_namespace(...))"
                )
        host = [np.asarray(B.to_numpy(o), dtype=np.float64) for o in outs]
        with np.errstate(invalid="ignore"):
            errors = [
                rel_error(h, e) if h.shape == e.shape and np.all(np.isfinite(h)) else math.inf
                for h, e in zip(host, expected)
            ]
        if all(err <= rtol for err in errors):
            for spec, o in zip(ex.outputs, outs):
                if o.dtype != getattr(xp, dtype):
                    return fail(
                        f"{where}: {spec.name} is {o.dtype} but the inputs were {dtype}: keep the inputs' "
                        "dtype (an array created without dtype=, or a float64 constant array, changes it)",
                        max(worst, *errors),
                    )
            worst = max(worst, *errors)
            continue
        # Wrong: a known mistake first, then shapes, non-finite values, and plain numbers.
        for mistake, answer in zip(ex.mistakes, wrong):
            if _matches(host, answer, expected, rtol):
                return fail(f"{where}: {mistake.hint}")
        for spec, h, e in zip(ex.outputs, host, expected):
            if h.shape != e.shape:
                return fail(f"{where}: {_shape_message(spec, h.shape, e.shape, case.sizes)}")
        for spec, h in zip(ex.outputs, host):
            if not np.all(np.isfinite(h)):
                why = ex.nonfinite or "a division by zero or an overflow?"
                return fail(f"{where}: {spec.name} contains NaN or inf ({why})")
        off = "; ".join(
            f"{s.name} is off (relative error {err:.2e})" for s, err in zip(ex.outputs, errors) if err > rtol
        )
        right = [s.name for s, err in zip(ex.outputs, errors) if err <= rtol]
        text = f"{where}: {off}" + (f"; {', '.join(right)} right" if right else "")
        return fail(text + (f". Usual suspects: {ex.suspects}" if ex.suspects else ""), max(errors))
    if ex.extra_check is not None:
        message = ex.extra_check(fn, xp, dtype)
        if message:
            return fail(message, worst)
    return GradeResult(
        ex.key,
        ex.title,
        True,
        f"all {len(rows)} cases agree with {ex.oracle} (largest relative error {worst:.1e}, tolerance {rtol:.0e})",
        worst,
    )
