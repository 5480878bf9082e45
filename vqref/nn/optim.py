"""Optimizers over named arrays: stochastic gradient descent with momentum, and Adam.

Symbols: p a parameter array, g its gradient, t the number of steps taken by that parameter,
lr the learning rate, lambda the weight decay.

An optimizer here holds no reference to a network, only to a mutable mapping ``name -> array``
(a module's ``params``, a plain dict, or a list of such mappings).  ``step(grads)`` reads each
parameter, computes its new value out of place, and writes it back with ``params[name] = new``.
That is the one form of update every Array API library supports (``array_api_strict`` has no
guaranteed in-place arithmetic on arrays that other code may hold), and with the live mappings of
:mod:`vqref.nn.layers` it replaces the array inside the layer that owns it.

A step is a transaction, like every call of the quantizer modules: it checks every gradient
(an array of the parameter's library, a real floating dtype, the parameter's shape, finite),
computes every new value and every new moment, checks that those are finite too, and only then
writes them all -- the parameters and the optimizer's state.  A refused step leaves every
parameter, every moment and every step count as it was.

The formulas follow ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly (including the L2 form
of weight decay, added to the gradient), so the two can be compared step by step
(:mod:`vqref.testing.torch_reference.nn`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from .. import backend as B
from ..backend import Array
from ..validation import check_dtype_name, check_fits, check_real

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer:
    """What SGD and Adam share: the parameter mappings, per-parameter state, and the step loop.

    Parameters
    ----------
    params : a mutable mapping ``name -> array``, or a list of them
        With a list, :meth:`step` takes either one mapping of gradients (then the names must be
        unique across the list) or a list of gradient mappings in the same order.
    lr : float, the learning rate (finite, >= 0)

    Notes
    -----
    Per-parameter state (moment buffers, step counts) is keyed by the parameter's position in
    the list and its name, and created on the parameter's first update, in its namespace, dtype
    and device.  A name missing from ``grads`` (or given ``None``) is skipped entirely: its
    value, its state and its step count stay as they are (what torch does for a parameter whose
    ``.grad`` is None).  A gradient whose name is no parameter is refused (``KeyError``).
    The state is replaced at each step, never changed in place: ``opt.state`` read before a
    step still holds the old moments afterwards.
    """

    def __init__(self, params: MutableMapping | Sequence[MutableMapping], lr: float):
        if isinstance(params, Mapping):
            groups = [params]
        elif isinstance(params, Sequence) and not isinstance(params, str):
            groups = list(params)
        else:
            groups = []
        if not groups or not all(isinstance(g, MutableMapping) for g in groups):
            raise TypeError("params must be a mutable mapping name -> array, or a non-empty list of them")
        self.groups = groups
        self.lr = check_real("lr", lr, 0.0)
        self.state: dict[tuple[int, str], dict] = {}

    def zero_state(self) -> None:
        """Forget all moments and step counts, as if the optimizer had just been created."""
        self.state = {}

    def _pairs(self, grads: Mapping | Sequence[Mapping]) -> list:
        """``(group index, group, name, grad)`` for every parameter that has a gradient."""
        if isinstance(grads, Mapping):
            if len(self.groups) > 1:
                seen: set = set()
                for group in self.groups:
                    clash = seen.intersection(group)
                    if clash:
                        raise ValueError(
                            f"parameter names {sorted(clash)} appear in more than one mapping; "
                            "pass the gradients as a list of mappings in the same order as params"
                        )
                    seen.update(group)
            grad_groups = [grads] * len(self.groups)
            unknown = set(grads).difference(*[set(group) for group in self.groups])
        elif isinstance(grads, Sequence) and not isinstance(grads, str):
            grad_groups = list(grads)
            if len(grad_groups) != len(self.groups):
                raise ValueError(f"got {len(grad_groups)} gradient mappings for {len(self.groups)} parameter mappings")
            if not all(isinstance(g, Mapping) for g in grad_groups):
                raise TypeError("grads must be a mapping name -> array, or a list of them")
            unknown = set().union(*[set(g).difference(group) for g, group in zip(grad_groups, self.groups)])
        else:
            raise TypeError(f"grads must be a mapping name -> array, or a list of them, got {type(grads).__name__}")
        if unknown:
            raise KeyError(f"gradients for {sorted(map(str, unknown))}, which are not parameters")
        return [
            (gi, group, name, ggroup[name])
            for gi, (group, ggroup) in enumerate(zip(self.groups, grad_groups))
            for name in list(group)
            if name in ggroup and ggroup[name] is not None
        ]

    def step(self, grads: Mapping | Sequence[Mapping]) -> None:
        """Update every parameter that has an entry in ``grads`` (same names, same shapes), or none.

        1. check every gradient against its parameter (nothing has changed yet);
        2. compute every new value and the new state (pure functions of the old ones: nothing is written);
        3. write the new values, then replace the state in one assignment.
        """
        checked = []
        for gi, group, name, g in self._pairs(grads):
            p = group[name]
            checked.append((gi, group, name, p, _checked_gradient(name, g, p)))
        updates, state = [], dict(self.state)
        for gi, group, name, p, g in checked:
            new, new_state = self._update(p, g, self.state.get((gi, name)))
            for label, a in (("value", new), *new_state.items()):
                if B.is_array(a) and not B.all_finite(a):
                    raise ValueError(
                        f"{name}: the step would make its {label} NaN or infinite (a learning rate or gradient too "
                        "large for the parameter's dtype); nothing was updated"
                    )
            updates.append((group, name, new))
            state[(gi, name)] = new_state
        for group, name, new in updates:  # every value is a finite array of the parameter's kind
            group[name] = new
        self.state = state

    def _update(self, p: Array, g: Array, state: dict | None) -> tuple[Array, dict]:  # pragma: no cover - abstract
        """``(new value, new state)`` from the value ``p``, the gradient ``g`` and the state
        (``None`` before the first step); a pure function: nothing is changed in place."""
        raise NotImplementedError


def _checked_gradient(name: str, g: Array, p: Any) -> Array:
    """``g`` if it fits parameter ``p`` (cast to ``p``'s dtype), or an error naming ``name``."""
    if not B.is_array(g):
        raise TypeError(f"{name}: the gradient must be an array, got {type(g).__name__}")
    if B.library_name(g) != B.library_name(p):
        raise TypeError(
            f"{name}: the gradient is a {B.library_name(g)} array but the parameter a {B.library_name(p)} one"
        )
    xp = B.get_namespace(p)
    if not xp.isdtype(g.dtype, "real floating"):
        raise TypeError(f"{name}: the gradient must be a real floating-point array, got dtype {g.dtype}")
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"{name}: gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)}")
    if not B.all_finite(g):
        raise ValueError(f"{name}: the gradient contains NaN or infinite values")
    if g.dtype != p.dtype:
        check_fits(f"{name}: the gradient", g, check_dtype_name("dtype", p.dtype), "the parameter")
        g = xp.astype(g, p.dtype)  # the parameter's dtype decides, and its state keeps it
    return g


def _check_fraction(name: str, value: Array) -> float:
    """A finite number in [0, 1), the range of a momentum or of an exponential decay rate."""
    v = check_real(name, value, 0.0)
    if v >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


class SGD(Optimizer):
    """Stochastic gradient descent with optional heavy-ball momentum and L2 weight decay.

    With ``g <- g + lambda p`` (weight decay) and a velocity buffer ``v`` (``v_1 = g_1``):

        v_t = mu v_{t-1} + g_t            (Polyak 1964; Sutskever et al. 2013, eq. 1, torch's form)
        p_t = p_{t-1} - lr v_t

    With ``momentum = 0`` this is plain ``p <- p - lr g``.

    Parameters
    ----------
    params : mapping(s) of name -> array, see :class:`Optimizer`
    lr : float, >= 0
    momentum : float, mu in [0, 1)
    weight_decay : float, lambda >= 0

    Every hyperparameter must be a finite real number (not a bool); a ``ValueError`` (or
    ``TypeError``) names the one that is not.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.momentum = _check_fraction("momentum", momentum)
        self.weight_decay = check_real("weight_decay", weight_decay, 0.0)

    def _update(self, p: Array, g: Array, state: dict | None) -> tuple[Array, dict]:
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not self.momentum:
            return p - self.lr * g, {}
        if state is None or "velocity" not in state:
            # The first step starts the buffer at g itself (no zero-initialised bias), as torch does;
            # a copy, so the buffer never shares memory with the caller's gradient.
            v = B.get_namespace(g).asarray(g, copy=True)
        else:
            v = self.momentum * state["velocity"] + g
        return p - self.lr * v, {"velocity": v}


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) with bias-corrected moments and optional L2 decay.

    With ``g <- g + lambda p`` (weight decay added to the gradient, torch's ``Adam``; not AdamW):

        m_t = beta1 m_{t-1} + (1 - beta1) g_t          first moment, m_0 = 0
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2        second moment, v_0 = 0
        m^_t = m_t / (1 - beta1^t),  v^_t = v_t / (1 - beta2^t)
        p_t = p_{t-1} - lr m^_t / (sqrt(v^_t) + eps)

    Why the correction: with m_0 = v_0 = 0 the moving averages are biased towards 0 in the first
    steps; dividing by ``1 - beta^t`` (the total weight given so far) removes that bias.

    Parameters
    ----------
    params : mapping(s) of name -> array, see :class:`Optimizer`
    lr : float, >= 0
    betas : (beta1, beta2), each in [0, 1)
    eps : float > 0, added to sqrt(v^) so that a parameter whose gradient has been 0 so far
        does not divide 0 by 0
    weight_decay : float, lambda >= 0

    Every hyperparameter must be a finite real number (not a bool); a ``ValueError`` (or
    ``TypeError``) names the one that is not.

    Notes
    -----
    The step count t is per parameter and lives on the host (a Python int), so the bias
    corrections are Python floats and never upcast float32 state.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_fraction("betas[0]", betas[0]), _check_fraction("betas[1]", betas[1]))
        self.eps = check_real("eps", eps, 0.0)
        if self.eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        self.weight_decay = check_real("weight_decay", weight_decay, 0.0)

    def _update(self, p: Array, g: Array, state: dict | None) -> tuple[Array, dict]:
        xp = B.get_namespace(p, g)
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not state:
            state = {"t": 0, "m": xp.zeros_like(p), "v": xp.zeros_like(p)}
        t = state["t"] + 1
        m = b1 * state["m"] + (1.0 - b1) * g  # same shape as p
        v = b2 * state["v"] + (1.0 - b2) * (g * g)
        m_hat = m / (1.0 - b1**t)
        v_hat = v / (1.0 - b2**t)
        return p - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps), {"t": t, "m": m, "v": v}
