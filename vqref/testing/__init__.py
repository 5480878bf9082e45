"""Checkers that learners can reuse: finite-difference VJPs and torch autograd references.

torch is imported lazily, inside :mod:`vqref.testing.torch_reference`, so importing
``vqref.testing`` never needs it.
"""

from .gradcheck import GradCheckResult, check_vjp, numerical_vjp, rel_error

__all__ = ["GradCheckResult", "check_vjp", "numerical_vjp", "rel_error"]
