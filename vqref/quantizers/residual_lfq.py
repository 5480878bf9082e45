"""``ResidualLFQ``: residual lookup-free quantization with vector-quantize-pytorch's API.

Symbols: N tokens (all leading axes flattened), D = dim, d = log2(codebook_size) bits per depth,
Q = num_quantizers.

The input is projected to d entries (when ``dim != d``), then Q lookup-free quantizers work on
the residuals (:func:`vqref.core.residual.residual_stack_forward`): depth l quantizes what the
depths before it left over, with codes of size ``2^-l`` (each depth's cube half as large as the
one before, so the sum of the depths refines one point ever more finely), and the output is the
projected sum of the codes.  ``quantized, indices, losses = rlfq(x)``, then
``dx = rlfq.backward(dquantized, dlosses=1.0)``.  A forward is one call into
:func:`vqref.core.lfq.residual_lfq_forward` between validation and one commit, as in :mod:`.lfq`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend as B
from ..backend import Array
from ..core.lfq import LFQOptions, LFQParams, lfq_codes, residual_lfq_backward, residual_lfq_forward
from ..ops.linear import linear_forward
from ..validation import check_bool, check_dtype_name, check_fits, check_index_array, check_seed
from .base import Quantizer
from .lfq_options import (
    FIT_FIX,
    PARAM_KEYS,
    check_mask,
    check_residual_lfq_options,
    check_upstream,
    linear_init,
    orthogonal_init,
    state_grads,
    token_rows,
    usage_stats,
)

__all__ = ["ResidualLFQ"]


class ResidualLFQ(Quantizer):
    """Residual lookup-free quantization (SoundStream's Algorithm 1, arXiv 2107.03312, with LFQ depths).

    ``quantized, indices, losses = rlfq(x)`` with ``x (..., dim)``, ``indices (..., Q)`` and one
    auxiliary loss per depth ``losses (Q,)``; then ``dx = rlfq.backward(dquantized, dlosses=1.0)``.

    Parameters (vector-quantize-pytorch's names and defaults)
    ----------
    dim : D
    num_quantizers : Q depths
    codebook_size : K = 2^d codes per depth; with ``dim != d`` the input is projected to d entries
        and back (learnable ``project_in.W (D, d)``, ``project_in.b``, ``project_out.W (d, D)``,
        ``project_out.b``)
    soft_clamp_input_value : v >= 1: depth l clamps its residual at ``v 2^-l`` (None: off)
    entropy_loss_weight, commitment_loss_weight, diversity_gamma, frac_per_sample_entropy,
    experimental_softplus_entropy_loss, entropy_loss_offset, spherical, orthogonal_rotation :
        every depth's :class:`vqref.LFQ` options (each depth draws its own entropy subset and has
        its own rotation ``layers.{l}.orthogonal_rot``)
    seed, dtype, xp, device : as :class:`vqref.LFQ`
    """

    CONFIG_KEYS = (
        "dim", "num_quantizers", "codebook_size", "soft_clamp_input_value", "entropy_loss_weight",
        "commitment_loss_weight", "diversity_gamma", "frac_per_sample_entropy",
        "experimental_softplus_entropy_loss", "entropy_loss_offset", "spherical", "orthogonal_rotation", "dtype",
    )  # fmt: skip

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        soft_clamp_input_value: float | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        orthogonal_rotation: bool = False,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
    ):
        args = dict(locals())
        options = check_residual_lfq_options(**{k: args[k] for k in self.CONFIG_KEYS if k != "dtype"})
        for key, value in options.items():
            setattr(self, key, value)
        self.codebook_dim = self.codebook_size.bit_length() - 1
        self.has_projections = self.dim != self.codebook_dim
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        arrays, d = {}, self.codebook_dim
        if self.has_projections:  # torch's order: project_in, project_out, then the depths
            arrays.update({"project_in." + k: v for k, v in linear_init(rng, self.dim, d, True).items()})
            arrays.update({"project_out." + k: v for k, v in linear_init(rng, d, self.dim, True).items()})
        if self.orthogonal_rotation:
            for level in range(self.num_quantizers):
                arrays[f"layers.{level}.orthogonal_rot"] = orthogonal_init(rng, d)
        self.training = True
        self._init_state(arrays, {}, (rng,), xp=namespace, device=device)
        self._like()  # a device the library refuses fails here, even without state arrays

    # ---------------------------------------------------------------- configuration

    def config(self) -> dict:
        cfg = {k: getattr(self, k) for k in self.CONFIG_KEYS if k != "dtype"}
        cfg["dtype"] = self._dtype_name
        return cfg

    @classmethod
    def check_config(cls, config: dict) -> dict:
        options = check_residual_lfq_options(**{k: config[k] for k in cls.CONFIG_KEYS if k != "dtype"})
        options["dtype"] = check_dtype_name("dtype", config["dtype"])
        return options

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        D, d = config["dim"], config["codebook_size"].bit_length() - 1
        spec = {}
        if D != d:
            spec.update({"project_in.W": (D, d), "project_in.b": (d,), "project_out.W": (d, D), "project_out.b": (D,)})
        if config["orthogonal_rotation"]:
            spec.update({f"layers.{level}.orthogonal_rot": (d, d) for level in range(config["num_quantizers"])})
        return spec

    def learnable_names(self) -> tuple:
        return tuple(k for k in self.state_spec() if k.startswith("project_"))

    def __repr__(self) -> str:
        return (
            f"ResidualLFQ(dim={self.dim}, num_quantizers={self.num_quantizers}, codebook_size={self.codebook_size}, "
            f"entropy_loss_weight={self.entropy_loss_weight}{', spherical=True' if self.spherical else ''})"
        )

    def _core(self, dtype: Any) -> tuple[LFQParams, list, list]:
        """The stack's parameters, and each depth's parameters and options, in ``dtype``."""
        xp, arrays = self.xp, self._state.arrays
        params = LFQParams(
            **{key: xp.astype(arrays[name], dtype) for name, key in PARAM_KEYS.items() if name in arrays}
        )
        depth_params, depth_options = [], []
        for level in range(self.num_quantizers):
            rot = arrays.get(f"layers.{level}.orthogonal_rot")
            depth_params.append(LFQParams(rotation=None if rot is None else xp.astype(rot, dtype)))
            depth_options.append(
                LFQOptions(
                    num_codebooks=1,
                    codebook_dim=self.codebook_dim,
                    codebook_scale=2.0**-level,
                    spherical=self.spherical,
                    soft_clamp=None
                    if self.soft_clamp_input_value is None
                    else self.soft_clamp_input_value * 0.5**level,
                    entropy_loss_weight=self.entropy_loss_weight,
                    commitment_loss_weight=self.commitment_loss_weight,
                    diversity_gamma=self.diversity_gamma,
                    softplus_offset=self.entropy_loss_offset if self.experimental_softplus_entropy_loss else None,
                )  # fmt: skip
            )
        return params, depth_params, depth_options

    # ---------------------------------------------------------------- forward / backward

    def forward(self, x: Array, mask: Array = None, return_all_codes: bool = False):
        """Quantize ``x`` residually.

        Parameters
        ----------
        x : (..., dim) float32 or float64 array of the module's library
        mask : optional (...) bool, the tokens the losses and ``stats`` count
        return_all_codes : also return every depth's codes, ``(Q, ..., d)``

        Returns
        -------
        quantized : (..., dim), x's dtype
        indices : (..., Q) int64 in [0, codebook_size)
        losses : (Q,) every depth's auxiliary loss (not summed)
        [all_codes : (Q, ..., d), with ``return_all_codes``]
        """
        self.check_input("x", x, last_dim=self.dim)
        all_codes = check_bool("return_all_codes", return_all_codes)
        lead = tuple(x.shape[:-1])
        if mask is not None:
            check_mask(mask, self._like(), lead)
        training = self.training  # read once
        with self._exclusive():
            xp, Q = self.xp, self.num_quantizers
            xf = xp.reshape(x, (-1, self.dim))  # (N, D)
            if training:  # the cache may refer to the input: a private copy
                xf = xp.asarray(xf, copy=True)
            rngs = self._rngs()
            N, dev = xf.shape[0], B.get_device(xf)
            mask_rows = token_rows(mask, N, 1.0, None)
            entropy_rows = []  # every depth draws its own subset, depth by depth
            for _ in range(Q):
                rows = token_rows(mask, N, self.frac_per_sample_entropy, rngs[0])  # eval: not committed
                entropy_rows.append(None if rows is None else B.from_numpy(rows, xp, device=dev))
            params, depth_params, depth_options = self._core(x.dtype)
            out, cache = residual_lfq_forward(
                xf, params, depth_params, depth_options, entropy_rows=entropy_rows,
                loss_rows=None if mask_rows is None else B.from_numpy(mask_rows, xp, device=dev),
            )  # fmt: skip
            if not B.all_finite(out.losses):
                raise ValueError("the auxiliary losses are not finite: x is too large for the entropy scores; scale x")
            stats = usage_stats(out.indices, mask_rows, self.codebook_size)
            if training:
                self._commit(self._updated(cache=(cache, tuple(x.shape), x.dtype), rngs=tuple(rngs), stats=stats))
            else:
                self._commit(self._updated(stats=stats))
        shield = self.shield if training else (lambda a: a)
        quantized = shield(xp.reshape(out.quantized, tuple(x.shape)))
        indices = xp.reshape(out.indices, lead + (Q,))
        if all_codes:
            return quantized, indices, out.losses, self.get_codes_from_indices(indices)
        return quantized, indices, out.losses

    def backward(self, dquantized: Array, dlosses: Any = 1.0) -> Array:
        """Gradient for the input of the last training forward; projection gradients in ``grads``.

        Parameters
        ----------
        dquantized : (..., dim)
        dlosses : (Q,) array, or a number for every depth (default 1.0: the losses are summed)

        Returns
        -------
        dx : (..., dim), the input's dtype.  The cache is consumed.
        """
        with self._exclusive():
            if self._state.cache is None:
                raise RuntimeError(
                    "backward() needs a training-mode forward first (and each forward allows one backward)"
                )
            cache, shape, dtype = self._state.cache
            xp = self.xp
            dtype_name = "float32" if dtype == xp.float32 else "float64"
            self.check_input("dquantized", dquantized, shape=shape)
            check_fits("dquantized", dquantized, dtype_name, "the forward's input", FIT_FIX)
            dl = check_upstream(self, "dlosses", dlosses, dtype_name, ((self.num_quantizers,), ()))
            dl = xp.astype(dl, dtype) if B.is_array(dl) else dl
            dq = xp.astype(xp.reshape(dquantized, (-1, self.dim)), dtype)
            dx, core_grads = residual_lfq_backward(dq, dl, cache)
            grads = state_grads(self, core_grads, PARAM_KEYS)
            self._commit(self._updated(cache=None))
        self.grads.clear()  # in place: views of this dict stay valid
        self.grads.update(grads)
        return xp.reshape(dx, shape)

    # ---------------------------------------------------------------- decoding

    def get_codes_from_indices(self, indices: Array) -> Array:
        """Every depth's codes for ``indices (..., Q)``: ``(Q, ..., d)`` in the module's dtype,
        each the code its depth outputs (scaled by ``2^-l``, on the sphere and rotated as the
        depth's options say)."""
        Q = self.num_quantizers
        if not B.is_array(indices) or indices.ndim < 1 or indices.shape[-1] != Q:
            got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
            raise ValueError(f"indices must be an integer array of shape (..., {Q}), got {got}")
        check_index_array("indices", indices, self._like(), self.codebook_size)
        xp, lead = self.xp, tuple(indices.shape[:-1])
        flat = xp.reshape(indices, (-1, Q))  # (M, Q)
        _, depth_params, depth_options = self._core(self.dtype)
        codes = [
            lfq_codes(flat[:, level : level + 1], depth_params[level], depth_options[level], dtype=self.dtype)
            for level in range(Q)
        ]  # Q arrays (M, d)
        return xp.reshape(xp.stack(codes, axis=0), (Q,) + lead + (self.codebook_dim,))

    def get_output_from_indices(self, indices: Array) -> Array:
        """The output for ``indices (..., Q)``: the projected sum of the depths' codes, ``(..., dim)``;
        for indices an eval forward returned, that forward's output (to rounding)."""
        xp = self.xp
        codes = self.get_codes_from_indices(indices)  # (Q, ..., d)
        total = xp.reshape(xp.sum(codes, axis=0), (-1, self.codebook_dim))  # (M, d)
        params, _, _ = self._core(self.dtype)
        if params.project_out_W is not None:
            total, _ = linear_forward(total, params.project_out_W, params.project_out_b)  # (M, D)
        return xp.reshape(total, tuple(indices.shape[:-1]) + (self.dim,))

    @property
    def codebooks(self) -> Array:
        """``(Q, K, d)``: every depth's codes in index order (what each depth outputs)."""
        K = self.codebook_size
        idx = B.from_numpy(np.arange(K, dtype=np.int64), self.xp, device=self.device)  # (K,)
        all_idx = self.xp.stack([idx] * self.num_quantizers, axis=1)  # (K, Q)
        return self.get_codes_from_indices(all_idx)  # (Q, K, d)
