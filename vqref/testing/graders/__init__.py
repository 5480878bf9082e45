"""Graders for the exercises in the repository's ``exercises/`` folder.

A learner implements a backward pass (or an update) from a stub; :func:`grade` runs it on a few
random problems, compares with an independent oracle (finite differences in float64, torch
autograd with ``.detach()``, or a plain loop) and says *pass* or *fail*, with a message that
points at the likely mistake when the answer matches a known wrong formula::

    >>> from vqref.testing.graders import grade
    >>> print(grade("ex01"))            # loads exercises/ex01_lookup_backward.py from here
    FAIL  ex01 lookup backward (segment sum): not implemented yet: ...
    >>> grade("ex01", my_function)       # or grade a function directly (a notebook cell)

From a shell: ``vqref grade ex01`` (``vqref grade all``, ``vqref grade --list``).

The exercises, the oracles and the known mistakes are in :mod:`.vq`, :mod:`.geometry`,
:mod:`.layers` and :mod:`.soft`; the machinery (cases, checks, messages, loading files) in :mod:`.engine`.
torch is imported inside the oracles that need it, never at import time.
"""

from __future__ import annotations

from typing import Any, Callable

from .engine import RTOL, Exercise, GradeResult, find_exercise_folder, grade_function, load_function
from .geometry import GEOMETRY_EXERCISES
from .layers import LAYER_EXERCISES
from .soft import SOFT_EXERCISES
from .vq import VQ_EXERCISES

__all__ = ["EXERCISES", "RTOL", "Exercise", "GradeResult", "grade", "get_exercise", "load_function", "main"]

# key ("ex01") -> Exercise, in the order of the track
EXERCISES: dict = {ex.key: ex for ex in VQ_EXERCISES + GEOMETRY_EXERCISES + LAYER_EXERCISES + SOFT_EXERCISES}


def get_exercise(exercise: Any) -> Exercise:
    """An exercise by key (``"ex01"``), number (``1``), function name or file stem."""
    if isinstance(exercise, Exercise):
        return exercise
    if isinstance(exercise, int) and not isinstance(exercise, bool):
        exercise = f"ex{exercise:02d}"
    for ex in EXERCISES.values():
        if exercise in (ex.key, ex.function, ex.stem):
            return ex
    raise KeyError(f"unknown exercise {exercise!r}; choose one of {', '.join(EXERCISES)} (vqref grade --list)")


def grade(
    exercise: Any,
    fn: Callable | None = None,
    *,
    directory: Any = None,
    solution: bool = False,
    backend: Any = "numpy",
    dtype: str = "float64",
    seed: int = 0,
) -> GradeResult:
    """Grade a learner's function for ``exercise``.

    Parameters
    ----------
    exercise : key ``"ex01"``, number ``1``, function name or file stem
    fn : the function to grade; default: load it from ``exercises/<stem>.py`` (fresh at every call)
    directory : the ``exercises/`` folder (default: ``./exercises``, or the checkout's)
    solution : load the reference solution from ``exercises/solutions/`` instead
    backend : the array library the function receives: ``"numpy"`` (default),
        ``"array_api_strict"`` (checks that the function is portable) or ``"cupy"``
    dtype : ``"float64"`` (default) or ``"float32"`` (the answers must keep the dtype)
    seed : the cases' seed

    Returns
    -------
    GradeResult(exercise, title, passed, message, max_error); ``bool(result)`` is ``passed``
    """
    ex = get_exercise(exercise)
    if fn is None:
        fn = load_function(ex, directory, solution=solution)
    return grade_function(ex, fn, backend=backend, dtype=dtype, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """``vqref grade [EXERCISE ... | all] [--dir PATH] [--solutions] [--backend B] [--dtype D] [--list]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="vqref grade", description="grade your solutions to the exercises")
    parser.add_argument("exercises", nargs="*", help="ex01 ... ex14, or all (default: all)")
    parser.add_argument("--dir", default=None, help="the exercises/ folder (default: ./exercises)")
    parser.add_argument("--solutions", action="store_true", help="grade the reference solutions instead")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "array_api_strict", "cupy"])
    parser.add_argument("--dtype", default="float64", choices=sorted(RTOL))
    parser.add_argument("--list", action="store_true", help="list the exercises and exit")
    args = parser.parse_args(argv)
    if args.list:
        for ex in EXERCISES.values():
            print(f"{ex.key}  {ex.stem + '.py':<36} {ex.title}")
        return 0
    chosen = list(EXERCISES) if not args.exercises or args.exercises == ["all"] else args.exercises
    try:
        exercises = [get_exercise(name) for name in chosen]
        folder = find_exercise_folder(args.dir)
    except (KeyError, FileNotFoundError) as err:
        print(f"vqref grade: {err.args[0]}")
        return 2
    passed = 0
    for ex in exercises:
        try:
            result = grade(ex, directory=folder, solution=args.solutions, backend=args.backend, dtype=args.dtype)
        except Exception as err:  # a file that does not import, a missing oracle library
            print(f"FAIL  {ex.key} {ex.title}: could not load or grade it: {type(err).__name__}: {err}")
            continue
        print(result)
        passed += result.passed
    print(f"{passed} of {len(exercises)} passed")
    return 0 if passed == len(exercises) else 1
