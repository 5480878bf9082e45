"""Checkers that learners can reuse: finite-difference VJPs and autograd references (torch and JAX).

* :func:`check_vjp` compares a backward with finite differences (smooth forwards, float64);
* :func:`check_against_jax` and :func:`check_against_torch` compare it with autograd of the same
  forward, written with a stop-gradient where the math has sg[.] (surrogate gradients too);
* :mod:`vqref.testing.torch_reference` and :mod:`vqref.testing.jax_reference` hold such forwards
  for the backwards of vqref (the JAX package's docstring has the table backward -> reference);
* :func:`grade` grades a learner's answer to one of the exercises in ``exercises/``
  (:mod:`vqref.testing.graders`; ``vqref grade exNN`` on the command line).

torch and JAX are imported lazily, inside the functions and reference packages that use them, so
importing ``vqref.testing`` needs neither.
"""

from .gradcheck import (
    GradCheckResult,
    ReferenceCheckResult,
    check_against_jax,
    check_against_torch,
    check_vjp,
    numerical_vjp,
    rel_error,
    torch_vjp,
)
from .graders import GradeResult, grade

__all__ = [
    "GradCheckResult",
    "GradeResult",
    "grade",
    "ReferenceCheckResult",
    "check_vjp",
    "check_against_jax",
    "check_against_torch",
    "numerical_vjp",
    "rel_error",
    "torch_vjp",
]
