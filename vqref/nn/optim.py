"""Optimizers over named arrays: stochastic gradient descent with momentum, and Adam.

Symbols: p a parameter array, g its gradient, t the number of steps taken by that parameter,
lr the learning rate, lambda the weight decay.

An optimizer here holds no reference to a network, only to a mutable mapping ``name -> array``
(a module's ``params``, a plain dict, or a list of such mappings).  ``step(grads)`` reads each
parameter, computes its new value out of place, and writes it back with ``params[name] = new``.
That is the one form of update every Array API library supports (``array_api_strict`` has no
guaranteed in-place arithmetic on arrays that other code may hold), and with the live mappings of
:mod:`vqref.nn.layers` it replaces the array inside the layer that owns it.

The formulas follow ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly (including the L2 form
of weight decay, added to the gradient), so the two can be compared step by step
(:mod:`vqref.testing.torch_reference.nn`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from .. import backend as B

__all__ = ["Optimizer", "SGD", "Adam"]


class Optimizer:
    """What SGD and Adam share: the parameter mappings, per-parameter state, and the step loop.

    Parameters
    ----------
    params : a mutable mapping ``name -> array``, or a list of them
        With a list, :meth:`step` takes either one mapping of gradients (then the names must be
        unique across the list) or a list of gradient mappings in the same order.
    lr : float, the learning rate

    Notes
    -----
    Per-parameter state (moment buffers, step counts) is keyed by the parameter's position in
    the list and its name, and created on the parameter's first update, in its namespace, dtype
    and device.  A name missing from ``grads`` is skipped entirely: its value, its state and its
    step count stay as they are (what torch does for a parameter whose ``.grad`` is None).
    """

    def __init__(self, params: MutableMapping | Sequence[MutableMapping], lr: float):
        if isinstance(params, Mapping):
            groups = [params]
        else:
            groups = list(params)
        if not groups or not all(isinstance(g, MutableMapping) for g in groups):
            raise TypeError("params must be a mutable mapping name -> array, or a non-empty list of them")
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.groups = groups
        self.lr = float(lr)
        self.state: dict[tuple[int, str], dict] = {}

    def zero_state(self) -> None:
        """Forget all moments and step counts, as if the optimizer had just been created."""
        self.state = {}

    def _pairs(self, grads: Mapping | Sequence[Mapping]):
        """Yield ``(group index, group, name, grad)`` for every parameter that has a gradient."""
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
        else:
            grad_groups = list(grads)
            if len(grad_groups) != len(self.groups):
                raise ValueError(f"got {len(grad_groups)} gradient mappings for {len(self.groups)} parameter mappings")
        for gi, (group, ggroup) in enumerate(zip(self.groups, grad_groups)):
            for name in list(group):
                if name in ggroup and ggroup[name] is not None:
                    yield gi, group, name, ggroup[name]

    def step(self, grads: Mapping | Sequence[Mapping]) -> None:
        """Update every parameter that has an entry in ``grads`` (same names, same shapes)."""
        for gi, group, name, g in self._pairs(grads):
            p = group[name]
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name}: gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)}"
                )
            state = self.state.setdefault((gi, name), {})
            group[name] = self._update(p, g, state)

    def _update(self, p: Any, g: Any, state: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with optional heavy-ball momentum and L2 weight decay.

    With ``g <- g + lambda p`` (weight decay) and a velocity buffer ``v`` (``v_1 = g_1``):

        v_t = mu v_{t-1} + g_t            (Polyak 1964; Sutskever et al. 2013, eq. 1, torch's form)
        p_t = p_{t-1} - lr v_t

    With ``momentum = 0`` this is plain ``p <- p - lr g``.

    Parameters
    ----------
    params : mapping(s) of name -> array, see :class:`Optimizer`
    lr : float
    momentum : float, mu in [0, 1)
    weight_decay : float, lambda >= 0
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    def _update(self, p: Any, g: Any, state: dict) -> Any:
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            # The first step starts the buffer at g itself (no zero-initialised bias), as torch does.
            v = g if "velocity" not in state else self.momentum * state["velocity"] + g
            state["velocity"] = v
            g = v
        return p - self.lr * g


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
    lr : float
    betas : (beta1, beta2), each in [0, 1)
    eps : float, added to sqrt(v^) so that a parameter with no gradient history does not divide by 0
    weight_decay : float, lambda >= 0

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
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError("eps and weight_decay must be >= 0")
        self.betas = (b1, b2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def _update(self, p: Any, g: Any, state: dict) -> Any:
        xp = B.get_namespace(p, g)
        b1, b2 = self.betas
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not state:
            state["t"] = 0
            state["m"] = xp.zeros_like(p)
            state["v"] = xp.zeros_like(p)
        t = state["t"] + 1
        m = b1 * state["m"] + (1.0 - b1) * g  # same shape as p
        v = b2 * state["v"] + (1.0 - b2) * (g * g)
        state["t"], state["m"], state["v"] = t, m, v
        m_hat = m / (1.0 - b1**t)
        v_hat = v / (1.0 - b2**t)
        return p - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
