"""``LFQ``: lookup-free quantization (MAGVIT-v2, arXiv 2310.05737) and binary spherical quantization
(BSQ, arXiv 2406.07548) with vector-quantize-pytorch's API.

Symbols: N tokens (all leading axes of the input flattened), D = dim, C = num_codebooks,
d = codebook_dim bits per codebook, K = codebook_size = 2^d.

``quantized, indices, aux_loss = lfq(x)``, then ``dx = lfq.backward(dquantized, daux_loss=1.0)``.
The codes are the 2^d sign patterns (:mod:`vqref.ops.lfq`), so nothing is looked up and the
only learnable arrays are the projections in and out (when ``dim != C d``).  A training forward:

    1. validate x, inv_temperature, mask       Quantizer.check_input, ...
    2. the rows of the entropy penalty          the mask's tokens; a random subset of them with
                                                frac_per_sample_entropy < 1 (host generator)
    3. quantize, losses                         core.lfq.lfq_forward
    4. commit cache, generators and stats       self._commit(...)

An eval forward computes the same outputs and the same auxiliary loss (with
``frac_per_sample_entropy < 1`` on a subset drawn from a copy of the generator, which is not
committed: repeated eval calls see the same subset) and commits only the usage statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import backend as B
from ..backend import Array
from ..core.lfq import LFQOptions, LFQParams, lfq_backward, lfq_codes, lfq_forward
from ..validation import check_bool, check_dtype_name, check_fits, check_index_array, check_real, check_seed
from .base import Quantizer
from .lfq_options import (
    FIT_FIX,
    PARAM_KEYS,
    check_lfq_options,
    check_mask,
    check_upstream,
    linear_init,
    orthogonal_init,
    state_grads,
    token_rows,
    usage_stats,
)

__all__ = ["LFQ", "LossBreakdown"]


class LossBreakdown(NamedTuple):
    """The unweighted terms of the auxiliary loss (vector-quantize-pytorch's names), 0-d arrays."""

    per_sample_entropy: Array
    batch_entropy: Array
    commitment: Array


class LFQ(Quantizer):
    """Lookup-free quantization (arXiv 2310.05737), optionally spherical (arXiv 2406.07548).

    ``quantized, indices, aux_loss = lfq(x)`` for ``x`` of shape ``(..., dim)``; then
    ``dx = lfq.backward(dquantized, daux_loss=1.0)``; projection gradients in ``lfq.grads``.

    Parameters (vector-quantize-pytorch's names and defaults)
    ----------
    dim : D; default ``log2(codebook_size) * num_codebooks``
    codebook_size : K = 2^d per codebook, a power of two; default ``2 ** dim``
    entropy_loss_weight : weight of the entropy penalty in ``aux_loss`` (0.1)
    commitment_loss_weight : weight of ``mse(u, sg[q])`` (0.0: not computed)
    diversity_gamma : gamma, the weight of the batch entropy inside the penalty (1.0)
    num_codebooks : C groups of d entries, each quantized on its own
    keep_num_codebooks_dim : indices ``(..., C)`` (default when C > 1) or ``(...)``
    codebook_scale : s, the size of every code entry (1.0)
    frac_per_sample_entropy : in (0, 1]: the penalty is computed on a random subset of
        ``max(1, int(N * frac))`` tokens, drawn from the module's generator (in eval from a copy
        that is not committed)
    has_projections : project in and out (default ``dim != d C``); learnable ``project_in.W``
        ``(D, C d)``, ``project_in.b``, ``project_out.W`` ``(C d, D)``, ``project_out.b``
    projection_has_bias : the projections have biases (True)
    soft_clamp_input_value : v >= s: ``v tanh(h / v)`` before quantizing (None: off)
    cosine_sim_project_in, cosine_sim_project_in_scale : project in by scaled cosine similarity
        (no bias; scale defaults to codebook_scale)
    experimental_softplus_entropy_loss, entropy_loss_offset : penalty ``softplus(L + offset)``
    spherical : BSQ: inputs and codes on the sphere of radius s
    orthogonal_rotation : a fixed random rotation of each codebook's entries (state
        ``orthogonal_rot (d, d)``, not learnable)
    channel_first : inputs ``(B, dim, ...)`` (outputs too; indices stay ``(B, ..., C)``); None
        (default, as vector-quantize-pytorch): channel-first for inputs of four or more axes
    seed, dtype, xp, device : the module's generator, state dtype ("float32"), array library, device

    Attributes
    ----------
    codebook_dim : d; ``stats`` : usage of the last forward (:attr:`Quantizer.stats`)
    """

    CONFIG_KEYS = (
        "dim", "codebook_size", "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma",
        "num_codebooks", "keep_num_codebooks_dim", "codebook_scale", "frac_per_sample_entropy",
        "has_projections", "projection_has_bias", "soft_clamp_input_value", "cosine_sim_project_in",
        "cosine_sim_project_in_scale", "experimental_softplus_entropy_loss", "entropy_loss_offset",
        "spherical", "orthogonal_rotation", "channel_first", "dtype",
    )  # fmt: skip

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        orthogonal_rotation: bool = False,
        channel_first: bool | None = None,
        seed: Any = None,
        dtype: Any = "float32",
        xp: Any = None,
        device: Any = None,
    ):
        args = dict(locals())
        options = check_lfq_options(**{k: args[k] for k in self.CONFIG_KEYS if k != "dtype"})
        for key, value in options.items():
            setattr(self, key, value)
        self.codebook_dim = self.codebook_size.bit_length() - 1
        self._dtype_name = check_dtype_name("dtype", dtype)
        rng = check_seed("seed", seed)
        namespace = B.namespace_from_module(xp)
        arrays = {}
        if self.has_projections:  # drawn in torch's order: project_in, then project_out
            cd = self.codebook_dim * self.num_codebooks
            if self.cosine_sim_project_in:
                arrays["project_in.W"] = rng.standard_normal((self.dim, cd))  # CosineSimLinear: randn
            else:
                arrays.update(
                    {"project_in." + k: v for k, v in linear_init(rng, self.dim, cd, self.projection_has_bias).items()}
                )
            arrays.update(
                {"project_out." + k: v for k, v in linear_init(rng, cd, self.dim, self.projection_has_bias).items()}
            )
        if self.orthogonal_rotation:
            arrays["orthogonal_rot"] = orthogonal_init(rng, self.codebook_dim)
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
        options = check_lfq_options(**{k: config[k] for k in cls.CONFIG_KEYS if k != "dtype"})
        options["dtype"] = check_dtype_name("dtype", config["dtype"])
        return options

    @classmethod
    def spec_from_config(cls, config: dict) -> dict:
        D, d = config["dim"], config["codebook_size"].bit_length() - 1
        cd = d * config["num_codebooks"]
        spec = {}
        if config["has_projections"]:
            bias = config["projection_has_bias"]
            spec["project_in.W"] = (D, cd)
            if bias and not config["cosine_sim_project_in"]:
                spec["project_in.b"] = (cd,)
            spec["project_out.W"] = (cd, D)
            if bias:
                spec["project_out.b"] = (D,)
        if config["orthogonal_rotation"]:
            spec["orthogonal_rot"] = (d, d)
        return spec

    def learnable_names(self) -> tuple:
        return tuple(k for k in self.state_spec() if k.startswith("project_"))

    def __repr__(self) -> str:
        flags = [k for k in ("spherical", "has_projections", "orthogonal_rotation") if getattr(self, k)]
        return (
            f"LFQ(dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"entropy_loss_weight={self.entropy_loss_weight}{''.join(', ' + f + '=True' for f in flags)})"
        )

    def _core(self, dtype: Any, inv_temperature: float = 100.0) -> tuple[LFQParams, LFQOptions]:
        """The parameters (in ``dtype``) and options of :func:`vqref.core.lfq.lfq_forward`."""
        xp, arrays = self.xp, self._state.arrays
        params = LFQParams(
            **{key: xp.astype(arrays[name], dtype) for name, key in PARAM_KEYS.items() if name in arrays},
            rotation=xp.astype(arrays["orthogonal_rot"], dtype) if "orthogonal_rot" in arrays else None,
        )
        options = LFQOptions(
            num_codebooks=self.num_codebooks, codebook_dim=self.codebook_dim, codebook_scale=self.codebook_scale,
            spherical=self.spherical, soft_clamp=self.soft_clamp_input_value,
            entropy_loss_weight=self.entropy_loss_weight, commitment_loss_weight=self.commitment_loss_weight,
            diversity_gamma=self.diversity_gamma, inv_temperature=inv_temperature,
            softplus_offset=self.entropy_loss_offset if self.experimental_softplus_entropy_loss else None,
            cosine_scale=self.cosine_sim_project_in_scale,
        )  # fmt: skip
        return params, options

    # ---------------------------------------------------------------- forward / backward

    def forward(
        self, x: Array, inv_temperature: float = 100.0, return_loss_breakdown: bool = False, mask: Array = None
    ):
        """Quantize ``x``.

        Parameters
        ----------
        x : (..., dim) float32 or float64 array of the module's library
        inv_temperature : tau of the entropy penalty's softmax (100, as vector-quantize-pytorch)
        return_loss_breakdown : also return :class:`LossBreakdown` (the unweighted terms)
        mask : optional (...) bool, the tokens the losses and ``stats`` count (all are quantized)

        Returns
        -------
        quantized : (..., dim), x's dtype; without projections every entry is ``+-codebook_scale``
            (``+-codebook_scale / sqrt(d)`` when spherical)
        indices : (..., C) int64, or (...) with ``keep_num_codebooks_dim=False``; in [0, K)
        aux_loss : 0-d, ``entropy_loss_weight * penalty + commitment_loss_weight * commitment``
        [breakdown : LossBreakdown, with ``return_loss_breakdown``]
        """
        first = self._is_channel_first(x)
        x_last = self.xp.moveaxis(x, 1, -1) if first else x  # (..., dim)
        self.check_input("x", x_last, last_dim=self.dim)
        tau = check_real("inv_temperature", inv_temperature)
        if tau <= 0:
            raise ValueError(f"inv_temperature must be > 0, got {tau}")
        breakdown = check_bool("return_loss_breakdown", return_loss_breakdown)
        lead = tuple(x_last.shape[:-1])
        if mask is not None:
            check_mask(mask, self._like(), lead)
        training = self.training  # read once
        with self._exclusive():
            xp = self.xp
            xf = xp.reshape(x_last, (-1, self.dim))  # (N, D)
            if training:  # the cache may refer to the input: a private copy
                xf = xp.asarray(xf, copy=True)
            rngs = self._rngs()
            mask_rows = token_rows(mask, xf.shape[0], 1.0, None)
            ent_rows = token_rows(mask, xf.shape[0], self.frac_per_sample_entropy, rngs[0])
            dev = B.get_device(xf)
            params, options = self._core(x.dtype, tau)
            out, cache = lfq_forward(
                xf, params, options,
                entropy_rows=None if ent_rows is None else B.from_numpy(ent_rows, xp, device=dev),
                loss_rows=None if mask_rows is None else B.from_numpy(mask_rows, xp, device=dev),
            )  # fmt: skip
            if not B.all_finite(out.aux_loss):
                raise ValueError(
                    "the auxiliary loss is not finite: x is too large for the entropy scores "
                    f"(2 * inv_temperature * |x| * codebook_scale * d overflows {x.dtype}); scale x or inv_temperature"
                )
            stats = usage_stats(out.indices, mask_rows, self.codebook_size)
            if training:
                pending = (cache, tuple(x.shape), x.dtype, first)
                self._commit(self._updated(cache=pending, rngs=tuple(rngs), stats=stats))
            else:
                self._commit(self._updated(stats=stats))
        shield = self.shield if training else (lambda a: a)
        quantized = xp.reshape(out.quantized, tuple(x_last.shape))  # (..., dim)
        quantized = shield(xp.moveaxis(quantized, -1, 1) if first else quantized)
        indices = xp.reshape(out.indices, lead + ((self.num_codebooks,) if self.keep_num_codebooks_dim else ()))
        result = (quantized, indices, out.aux_loss)
        if breakdown:
            return result, LossBreakdown(out.per_sample_entropy, out.batch_entropy, out.commitment)
        return result

    def backward(self, dquantized: Array, daux_loss: Any = 1.0) -> Array:
        """Gradient for the input of the last training forward; projection gradients in ``grads``.

        Parameters
        ----------
        dquantized : (..., dim), the upstream gradient of ``quantized``
        daux_loss : the upstream gradient of ``aux_loss``, a real number or 0-d array (1.0)

        Returns
        -------
        dx : (..., dim), the input's dtype: the decoder's gradient straight through the sign (a
            surrogate) plus the losses' true gradients.  The cache is consumed.
        """
        with self._exclusive():
            if self._state.cache is None:
                raise RuntimeError(
                    "backward() needs a training-mode forward first (and each forward allows one backward)"
                )
            cache, shape, dtype, first = self._state.cache
            xp = self.xp
            dtype_name = "float32" if dtype == xp.float32 else "float64"
            self.check_input("dquantized", dquantized, shape=shape)
            check_fits("dquantized", dquantized, dtype_name, "the forward's input", FIT_FIX)
            daux = check_upstream(self, "daux_loss", daux_loss, dtype_name, ((),))
            daux = xp.astype(daux, dtype) if B.is_array(daux) else daux
            dq_last = xp.moveaxis(dquantized, 1, -1) if first else dquantized  # (..., dim)
            dq = xp.astype(xp.reshape(dq_last, (-1, self.dim)), dtype)
            dx, core_grads = lfq_backward(dq, daux, cache)
            grads = state_grads(self, core_grads, PARAM_KEYS)
            self._commit(self._updated(cache=None))
        self.grads.clear()  # in place: views of this dict stay valid
        self.grads.update(grads)
        dx = xp.reshape(dx, tuple(dq_last.shape))
        return xp.moveaxis(dx, -1, 1) if first else dx

    # ---------------------------------------------------------------- the implicit codebook

    def indices_to_codes(self, indices: Array, project_out: bool = True) -> Array:
        """The output for ``indices`` ``(..., C)`` (or ``(...)`` without the codebook axis).

        Returns
        -------
        codes : (..., dim) with ``project_out`` (the eval forward's output for these indices),
            else (..., C d), in the module's dtype
        """
        C = self.num_codebooks
        if self.keep_num_codebooks_dim and (not B.is_array(indices) or indices.ndim < 1 or indices.shape[-1] != C):
            got = tuple(indices.shape) if B.is_array(indices) else type(indices).__name__
            raise ValueError(f"indices must be an integer array of shape (..., {C}), got {got}")
        check_index_array("indices", indices, self._like(), self.codebook_size)
        project_out = check_bool("project_out", project_out)
        lead = tuple(indices.shape[:-1]) if self.keep_num_codebooks_dim else tuple(indices.shape)
        flat = self.xp.reshape(indices, (-1, C))  # (M, C)
        params, options = self._core(self.dtype)
        codes = lfq_codes(flat, params, options, dtype=self.dtype, project_out=project_out)
        codes = self.xp.reshape(codes, lead + (codes.shape[-1],))
        # as vector-quantize-pytorch: channel-first for channel_first, and for the indices of
        # images and videos when channel_first is None
        auto = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        first = auto if self.channel_first is None else self.channel_first
        return self.xp.moveaxis(codes, -1, 1) if first and codes.ndim >= 2 else codes

    def _is_channel_first(self, x: Any) -> bool:
        """Whether ``x`` is read channel-first (an array of the module's library, two or more axes)."""
        if not (B.is_array(x) and B.library_name(x) == B.library_name(self._like()) and x.ndim >= 2):
            return False  # check_input refuses what is not an array of the library
        return x.ndim >= 4 if self.channel_first is None else self.channel_first
